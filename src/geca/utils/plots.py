"""Plots written next to a run's outputs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator  # noqa: E402

from geca.utils.io import atomic_write, csv_rows  # noqa: E402


def plot_loss_curve(log_csv: Path, out: Path) -> Path | None:
    """Loss (and its ε-MSE and VLB parts) against step, from a run's log.csv."""
    rows = csv_rows(log_csv)
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in ("loss", "mse", "vb"):
        if rows[0].get(key):
            ax.plot(steps, [float(r[key]) for r in rows], label=key, marker="o" if len(rows) < 3 else None)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    atomic_write(Path(out), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(out)


def _save_rgb(fig: Any, path: Path) -> None:
    """A figure as an RGB PNG (matplotlib writes RGBA), like the sample images beside it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    Image.open(buf).convert("RGB").save(path, format="PNG")


def plot_class_grid(images: np.ndarray, class_names: list[str], per_class: int, out: Path,
                    title: str = "") -> Path:
    """One row per class of (N, H, W, C) uint8 images, rows labelled with the class name."""
    rows = [images[r * per_class:(r + 1) * per_class] for r in range(len(class_names))]
    return plot_image_rows(rows, class_names, out, title=title)


def plot_image_rows(rows: list[np.ndarray], row_labels: list[str], out: Path, col_labels: list[str] | None = None,
                    title: str = "") -> Path:
    """A grid of uint8 images (one (N, H, W, C) array per row), rows labelled on the left, columns optionally on top."""
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 1.2, len(rows) * 0.9 + 0.4), dpi=120,
                             squeeze=False)
    for r, frames in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = frames[c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col_labels and r == 0:
                ax.set_title(col_labels[c], fontsize=6)
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(Path(out), lambda p: _save_rgb(fig, p))
    plt.close(fig)
    return Path(out)


def plot_ghg_trace(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Four panels against the reverse step, one line per GHG mode: |C_h|, |C_out|, predicted-ε std, x̂0 range."""
    modes = list(dict.fromkeys(r["ghg"] for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=110)
    panels = [("hidden_mean", "mean |C_h|", True), ("out_mean", "mean |C_out|", True),
              ("eps_std", "predicted ε std", False), ("x0_max", "x̂0 range (min…max)", False)]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for mode in modes:
            mine = [r for r in rows if r["ghg"] == mode]
            steps = [r["step"] for r in mine]
            line, = ax.plot(steps, [float(r[key]) for r in mine], label=mode)
            if key == "x0_max":
                ax.plot(steps, [float(r["x0_min"]) for r in mine], color=line.get_color())
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("reverse step")
        if log:
            ax.set_yscale("symlog", linthresh=1e-2)
            # 1-2-5 ticks, labelled: decades alone leave a panel spanning less than one decade unlabelled
            ax.yaxis.set_major_locator(SymmetricalLogLocator(linthresh=1e-2, base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3)
    axes[0].legend(title="GHG", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(Path(out), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(out)
