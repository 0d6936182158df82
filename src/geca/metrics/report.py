"""What `geca evaluate` shows: the Table 1 comparison and real-vs-generated grids per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from geca.data.imageset import ImageSet
from geca.utils.images import grid
from geca.utils.io import atomic_write
from geca.utils.plots import plt


def pm(d: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± std` of a metric result (scaled), or a dash where there is none."""
    if d is None:
        return "—"
    return f"{d['mean'] * scale:.{digits}f} ± {d['std'] * scale:.{digits}f}"


def comparison_table(report: dict[str, Any]) -> Table:
    """One row per generated set, in the layout of GeCA's Table 1 (KID×10³, LPIPS, GG) plus FLD, KID's standard
    error over generated sets and class-faithfulness."""
    real = report["real"]
    t = Table(title=f"{report['protocol']} protocol; KID on {report['features']['name']} features, GG and FLD on "
                    f"{report['gg_features']['name']}; real = {real['spec']}:{real['split']} ({real['n']} images; "
                    f"class-faithfulness {faithful(real.get('faithfulness'))})")
    for col in ("generated", "N", "KID×10³ ↓", "KID s.e.", "LPIPS ↑", "GG ↑", "FLD ↓", "faithful ↑ (chance)"):
        t.add_column(col, justify="left" if col == "generated" else "right")
    for r in report["results"]:
        t.add_row(r["name"], str(r["n"]), pm(r["kid"], 1e3), f"{r['kid']['se'] * 1e3:.1f}", pm(r["lpips"], digits=4),
                  f"{r['fld']['gg']:.2f}", f"{r['fld']['fld']:.2f}", faithful(r.get("faithfulness")))
    return t


def faithful(f: dict[str, Any] | None) -> str:
    """Class-faithfulness with its chance level, e.g. `0.82 (0.31)`."""
    if not f or f.get("value") is None:
        return "—"
    return f"{f['value']:.2f} ({f['chance']:.2f})"


def per_class_table(report: dict[str, Any]) -> Table | None:
    """KID×10³ per class (classes with ≥ the minimum number of images in both sets); None if there are none."""
    classes = [c for c in report["class_names"] if any(c in r["kid_per_class"] for r in report["results"])]
    if not classes:
        return None
    t = Table(title=f"per-class KID×10³ (classes with ≥ {report['per_class_min']} images in both sets)")
    t.add_column("generated")
    for c in classes:
        t.add_column(c, justify="right")
    for r in report["results"]:
        t.add_row(r["name"], *(pm(r["kid_per_class"].get(c), 1e3) for c in classes))
    return t


def real_vs_generated_grid(real: ImageSet, generated: ImageSet, out: Path, per_class: int = 8, seed: int = 0,
                           title: str = "") -> Path:
    """One row per class: `per_class` real images (left) beside as many generated ones (right)."""
    rng = np.random.default_rng(seed)
    names = real.class_names
    fig, axes = plt.subplots(len(names), 2, figsize=(2 * per_class * 0.6 + 1.5, len(names) * 0.75 + 0.6), dpi=120,
                             squeeze=False)
    for row, name in enumerate(names):
        for col, (data, label) in enumerate(((real, "real"), (generated, "generated"))):
            ax = axes[row][col]
            idx = np.flatnonzero(data.labels[:, row] > 0)
            pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else idx
            if len(pick):
                tile = grid(data.images[pick], nrow=per_class)
                ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
        axes[row][0].set_ylabel(f"{name} ({int((real.labels[:, row] > 0).sum())}/"
                                f"{int((generated.labels[:, row] > 0).sum())})", rotation=0, ha="right",
                                va="center", fontsize=8)
    if title:
        fig.suptitle(f"{title}   (rows: class, n real / n generated)", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(out), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(out)
