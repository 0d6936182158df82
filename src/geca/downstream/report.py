"""Table 2 from the protocol's results: scores per unit, mean ± std, paired p-values, and the files."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from geca.downstream.metrics import binary_auc, eye_level, macro_metric, score
from geca.downstream.protocol import BASELINE, ProtocolResult, UnitResult
from geca.downstream.significance import TEST_NAMES, paired_bootstrap, paired_test
from geca.utils.io import atomic_write_json, atomic_write_text, staged_dir
from geca.utils.plots import plt

COLUMNS = {"sen": "Sen", "spe": "Spe", "auc": "AUC", "f1": "F1", "f1_sen_spe": "F1_sen/spe", "map": "mAP",
           "acc": "ACC"}
MIN_UNITS_FOR_PAIRED_TEST = 5


def _clean(x: Any) -> Any:
    """JSON-safe: NaN → None, numpy → Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def level_inputs(r: UnitResult, level: str, multilabel: bool, eye_agg: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of one unit at scan level, or aggregated per eye."""
    if level == "scan":
        return r.labels, r.probs
    probs, labels = eye_level(r.probs, r.labels, r.eyes, multilabel, eye_agg)
    return labels, probs


def choose_test(test: str, protocol: ProtocolResult, seeds: int) -> str:
    """``auto``: a paired t-test over units (folds × seeds), or a bootstrap over test cases with fewer than 5."""
    if test != "auto":
        return test
    units = len(protocol.sizes) * seeds
    return "bootstrap" if units < MIN_UNITS_FOR_PAIRED_TEST else "ttest"


def summarise(protocol: ProtocolResult, arms: list[str], seeds: int, eye_agg: str, test: str, p_metric: str,
              n_boot: int, config: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, JSON-ready: per-unit scores, mean ± std per arm and level, p-values."""
    ml = protocol.multilabel
    metrics = [m for m in COLUMNS if not ml or m != "acc"]
    if p_metric not in metrics:
        raise ValueError(f"--p-metric {p_metric!r} is not reported for this data; valid: {', '.join(metrics)}")
    has_eyes = all(r.eyes is not None for r in protocol.results)
    levels = ["scan", "eye"] if has_eyes else ["scan"]
    test = choose_test(test, protocol, seeds)
    by_arm: dict[str, list[UnitResult]] = {a: [r for r in protocol.results if r.arm == a] for a in arms}
    out: dict[str, Any] = {
        "data": protocol.data, "protocol": protocol.protocol, "seeds": seeds, "class_names": protocol.class_names,
        "multilabel": ml, "splits": protocol.sizes, "levels": levels, "eye_agg": eye_agg, "metrics": metrics,
        "p_metric": p_metric, "test": TEST_NAMES[test], "bootstrap": n_boot if test == "bootstrap" else None,
        "baseline": BASELINE if BASELINE in arms else None, "config": config, "arms": {},
    }
    for arm, units in by_arm.items():
        entry: dict[str, Any] = {"units": [], "summary": {}, "significance": {}}
        for r in units:
            unit = {"fold": r.fold, "seed": r.seed, "best_epoch": r.best_epoch, "val_auc": r.val_auc,
                    "seconds": r.seconds, "n_real": r.n_real, "n_synthetic": r.n_synthetic, "history": r.history}
            for level in levels:
                s = score(*level_inputs(r, level, ml, eye_agg), ml)
                unit[level] = {"macro": s["macro"], "per_class": {k: v.tolist() for k, v in s["per_class"].items()}}
            entry["units"].append(unit)
        for level in levels:
            entry["summary"][level] = {}
            for m in metrics:
                values = np.array([u[level]["macro"][m] for u in entry["units"]], dtype=np.float64)
                finite = values[np.isfinite(values)]
                entry["summary"][level][m] = {
                    "mean": float(finite.mean()) if len(finite) else float("nan"),
                    "std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
                    "n": len(finite),
                }
        out["arms"][arm] = entry
    if out["baseline"] is not None:
        for arm in arms:
            if arm != BASELINE:
                out["arms"][arm]["significance"] = _significance(
                    by_arm[arm], by_arm[BASELINE], out["arms"][arm], out["arms"][BASELINE], levels, metrics, ml,
                    eye_agg, test, p_metric, n_boot)
    return _clean(out)


def _significance(arm: list[UnitResult], base: list[UnitResult], arm_entry: dict, base_entry: dict,
                  levels: list[str], metrics: list[str], ml: bool, eye_agg: str, test: str, p_metric: str,
                  n_boot: int) -> dict[str, dict[str, Any]]:
    """p-values of arm vs baseline per level: every metric for paired tests, the p-metric for the bootstrap."""
    key = {(u["fold"], u["seed"]): i for i, u in enumerate(base_entry["units"])}
    pairs = [(i, key[(u["fold"], u["seed"])]) for i, u in enumerate(arm_entry["units"])]
    out: dict[str, dict[str, Any]] = {}
    for level in levels:
        out[level] = {}
        if test == "bootstrap":
            inputs = [(level_inputs(arm[i], level, ml, eye_agg), level_inputs(base[j], level, ml, eye_agg))
                      for i, j in pairs]
            result = paired_bootstrap(
                lambda y, p: macro_metric(y, p, ml, p_metric),
                [a[0] for a, _ in inputs], [a[1] for a, _ in inputs], [b[1] for _, b in inputs],
                test_sets=[arm[i].fold for i, _ in pairs], n_boot=n_boot)
            out[level][p_metric] = result.to_dict()
            continue
        for m in metrics:
            a = [arm_entry["units"][i][level]["macro"][m] for i, _ in pairs]
            b = [base_entry["units"][j][level]["macro"][m] for _, j in pairs]
            out[level][m] = paired_test(a, b, test).to_dict()
    return out


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{100 * stat['mean']:.2f}"
    return text if stat["std"] is None else f"{text} ± {100 * stat['std']:.2f}"


def _p_cell(summary: dict[str, Any], arm: str, level: str) -> str:
    if arm == summary["baseline"] or summary["baseline"] is None:
        return "—"
    sig = summary["arms"][arm]["significance"][level][summary["p_metric"]]
    return sig["stars"] if sig["p"] is None else f"{sig['stars']} ({sig['p']:.2g})"


def markdown(summary: dict[str, Any]) -> str:
    """Table 2: one table per level, rows = arms, values ×100 as mean ± std over folds × seeds."""
    metrics = summary["metrics"]
    n_units = {len(e["units"]) for e in summary["arms"].values()}
    lines = [f"# Downstream classification ({summary['data']})", "",
             f"{summary['protocol']}, {summary['seeds']} seed(s): mean ± std over "
             f"{'/'.join(map(str, sorted(n_units)))} unit(s) (folds × seeds), ×100; metrics are macro-averaged over "
             f"{len(summary['class_names'])} classes ({'multi-label' if summary['multilabel'] else 'multi-class'})."]
    for level in summary["levels"]:
        title = "Scan level" if level == "scan" else f"Eye level ({summary['eye_agg']} of each eye's scans)"
        lines += ["", f"## {title}", "",
                  "| Arm | " + " | ".join(COLUMNS[m] for m in metrics) + " | p |",
                  "|---|" + "---:|" * len(metrics) + "---|"]
        for arm, entry in summary["arms"].items():
            cells = [_cell(entry["summary"][level][m]) for m in metrics]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_p_cell(summary, arm, level)} |")
    if summary["baseline"] is not None and len(summary["arms"]) > 1:
        over = f"test cases ({summary['bootstrap']} replicates)" if summary["bootstrap"] else "matched units"
        lines += ["", f"p: {summary['test']} of {COLUMNS[summary['p_metric']]} against `{summary['baseline']}` "
                      f"over {over}; * < 0.05, ** < 0.01, *** < 0.001, **** < 0.0001, ns otherwise."]
    return "\n".join(lines) + "\n"


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def table_csv(summary: dict[str, Any]) -> str:
    """One row per arm and level: mean and std of every metric (fractions, not ×100) and the p-value."""
    metrics = summary["metrics"]
    rows: list[list[Any]] = [["arm", "level", "units", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
                              "p", "stars", "test"]]
    for arm, entry in summary["arms"].items():
        for level in summary["levels"]:
            stats = entry["summary"][level]
            sig = entry["significance"].get(level, {}).get(summary["p_metric"], {})
            rows.append([arm, level, len(entry["units"]), *(stats[m][s] for m in metrics for s in ("mean", "std")),
                         sig.get("p"), sig.get("stars"), sig.get("test")])
    return _csv(rows)


def units_csv(summary: dict[str, Any]) -> str:
    """One row per arm, unit and level: the raw macro metrics."""
    metrics = summary["metrics"]
    rows: list[list[Any]] = [["arm", "level", "fold", "seed", "best_epoch", "val_auc", "seconds", *metrics]]
    for arm, entry in summary["arms"].items():
        for u in entry["units"]:
            for level in summary["levels"]:
                rows.append([arm, level, u["fold"], u["seed"], u["best_epoch"], u["val_auc"], u["seconds"],
                             *(u[level]["macro"][m] for m in metrics)])
    return _csv(rows)


def plot_roc(units: list[UnitResult], class_names: list[str], title: str, path: Path) -> None:
    """Per-class ROC curves of one arm, test scores pooled over its units (scan level)."""
    labels = np.concatenate([u.labels for u in units]) > 0.5
    probs = np.concatenate([u.probs for u in units])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for k, name in enumerate(class_names):
        if labels[:, k].any() and not labels[:, k].all():
            fpr, tpr, _ = roc_curve(labels[:, k], probs[:, k])
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {binary_auc(labels[:, k], probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def roc_filename(arm: str) -> str:
    return "roc_" + re.sub(r"[^A-Za-z0-9_-]", "_", arm.replace("+", "plus_")) + ".png"


def write_report(out: Path, summary: dict[str, Any], protocol: ProtocolResult) -> dict[str, Path]:
    """Write table.md, table.csv, units.csv, results.json and one ROC plot per arm into ``out`` as a whole."""
    out = Path(out)
    with staged_dir(out) as tmp:
        atomic_write_text(tmp / "table.md", markdown(summary))
        atomic_write_text(tmp / "table.csv", table_csv(summary))
        atomic_write_text(tmp / "units.csv", units_csv(summary))
        atomic_write_json(tmp / "results.json", summary)
        for arm in summary["arms"]:
            units = [r for r in protocol.results if r.arm == arm]
            plot_roc(units, protocol.class_names, f"{arm}: test ROC, pooled over {len(units)} unit(s)",
                     tmp / roc_filename(arm))
    return {name: out / name for name in ("table.md", "table.csv", "units.csv", "results.json")}
