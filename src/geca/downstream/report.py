"""Table 2 from the protocol's results: scores per unit, mean ± std, paired p-values, and the files."""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from geca.downstream.metrics import binary_auc, eye_level, macro_metric, mixed_eye, score
from geca.downstream.protocol import BASELINE, ProtocolResult, UnitResult
from geca.downstream.significance import FOLD_TESTS, TEST_NAMES, paired_bootstrap, paired_test
from geca.errors import ConfigError
from geca.utils.io import atomic_write_json, atomic_write_text, few, other_files, staged_dir
from geca.utils.plots import plt

COLUMNS = {"sen": "Sen", "spe": "Spe", "auc": "AUC", "f1": "F1", "f1_sen_spe": "F1_sen/spe", "map": "mAP",
           "acc": "ACC"}


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


def _stars_from(test: str, folds: int) -> str:
    """Which test the stars come from: `cases` (the paired bootstrap; `auto`) or `folds` (t-test, Wilcoxon)."""
    if test not in FOLD_TESTS:
        return "cases"
    if folds < 2:
        raise ConfigError(f"--test {test} compares folds, and this protocol has {folds}; seeds share their data and "
                          "are not independent units: use --test bootstrap (over test cases)")
    return "folds"


def _stat(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if len(v) else float("nan"), "std": float(v.std(ddof=1)) if len(v) > 1 else
            float("nan"), "n": len(v)}


def _ensemble(units: list[UnitResult], fold: int | None) -> tuple[np.ndarray, np.ndarray, UnitResult]:
    """One fold's test labels, scores averaged over its seeds (one score per test case), and one of its units."""
    mine = [u for u in units if u.fold == fold]
    return mine[0].labels, np.mean([u.probs for u in mine], axis=0), mine[0]


def _clusters(unit: UnitResult, level: str) -> np.ndarray | None:
    """What the bootstrap resamples whole at `level`: each scan's patient (else its eye), or each eye's patient (in
    eye_level's sorted order); None where every case stands alone."""
    if level == "scan":
        return unit.patients if unit.patients is not None else unit.eyes
    if unit.patients is None or unit.eyes is None:
        return None
    _, first = np.unique(np.asarray(unit.eyes).astype(str), return_index=True)
    return np.asarray(unit.patients)[first]


def summarise(protocol: ProtocolResult, arms: list[str], seeds: int, eye_agg: str, test: str, p_metric: str,
              n_boot: int, config: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, JSON-ready: per-unit scores, mean ± std per arm and level, p-values.

    Seeds are averaged within each fold before anything is compared: the table shows mean ± std over folds (over
    seeds on a fixed split), the fold test compares folds, the bootstrap resamples test cases of seed-averaged scores.
    """
    ml = protocol.multilabel
    metrics = [m for m in COLUMNS if not ml or m != "acc"]
    if p_metric not in metrics:
        raise ValueError(f"--p-metric {p_metric!r} is not reported for this data; valid: {', '.join(metrics)}")
    has_eyes = all(r.eyes is not None for r in protocol.results)
    mixed = None if ml or not has_eyes else next(
        (m for r in protocol.results if (m := mixed_eye(r.labels, r.eyes)) is not None), None)
    if mixed is not None:  # scan level still holds: report it rather than lose every trained classifier's scores
        warnings.warn(f"eye {mixed!r} has scans of different classes; eye-level scores of multi-class data need one "
                      "class per eye, so only scan level is reported", stacklevel=2)
    levels = ["scan", "eye"] if has_eyes and mixed is None else ["scan"]
    folds = [s["fold"] for s in protocol.sizes]
    stars_from = _stars_from(test, len(folds))
    fold_test = test if test in FOLD_TESTS else "ttest"
    by_arm: dict[str, list[UnitResult]] = {a: [r for r in protocol.results if r.arm == a] for a in arms}
    out: dict[str, Any] = {
        "data": protocol.data, "protocol": protocol.protocol, "seeds": seeds, "class_names": protocol.class_names,
        "multilabel": ml, "splits": protocol.sizes, "levels": levels, "eye_agg": eye_agg, "metrics": metrics,
        "p_metric": p_metric, "stars_from": stars_from, "test": TEST_NAMES["bootstrap" if stars_from == "cases"
                                                                          else fold_test],
        "tests": {"cases": TEST_NAMES["bootstrap"], "folds": TEST_NAMES[fold_test] if len(folds) > 1 else None},
        "bootstrap": n_boot, "spread_over": "folds" if len(folds) > 1 else "seeds",
        "bootstrap_resamples": "patients" if all(r.patients is not None for r in protocol.results) else
        "eyes" if has_eyes else "cases",
        "baseline": BASELINE if BASELINE in arms else None, "config": config, "arms": {},
    }
    for arm, units in by_arm.items():
        entry: dict[str, Any] = {"units": [], "folds": [], "summary": {}, "significance": {}}
        for r in units:
            unit = {"fold": r.fold, "seed": r.seed, "best_epoch": r.best_epoch, "val_auc": r.val_auc,
                    "seconds": r.seconds, "n_real": r.n_real, "n_synthetic": r.n_synthetic, "history": r.history}
            for level in levels:
                sc = score(*level_inputs(r, level, ml, eye_agg), ml)
                unit[level] = {"macro": sc["macro"], "per_class": {k: v.tolist() for k, v in sc["per_class"].items()}}
            entry["units"].append(unit)
        for f in folds:
            mine = [u for u in entry["units"] if u["fold"] == f]
            entry["folds"].append({"fold": f, "seeds": len(mine), **{
                level: {m: float(np.nanmean([u[level]["macro"][m] for u in mine])) for m in metrics}
                for level in levels}})
        spread = entry["folds"] if len(folds) > 1 else [{lv: u[lv]["macro"] for lv in levels} for u in entry["units"]]
        entry["summary"] = {level: {m: _stat([x[level][m] for x in spread]) for m in metrics} for level in levels}
        out["arms"][arm] = entry
    if out["baseline"] is not None:
        for arm in arms:
            if arm != BASELINE:
                out["arms"][arm]["significance"] = _significance(
                    by_arm[arm], by_arm[BASELINE], out["arms"][arm], out["arms"][BASELINE], folds, levels, metrics,
                    ml, eye_agg, fold_test, p_metric, n_boot)
    return _clean(out)


def _significance(arm: list[UnitResult], base: list[UnitResult], arm_entry: dict, base_entry: dict,
                  folds: list[int | None], levels: list[str], metrics: list[str], ml: bool, eye_agg: str,
                  fold_test: str, p_metric: str, n_boot: int) -> dict[str, dict[str, Any]]:
    """Per level: the bootstrap over test cases of the p-metric, and (with ≥ 2 folds) a test over folds of every
    metric."""
    out: dict[str, dict[str, Any]] = {}
    for level in levels:
        inputs = []
        for f in folds:
            (y, a, unit), (_, b, _) = _ensemble(arm, f), _ensemble(base, f)
            if level == "eye":
                (a, y), (b, _) = eye_level(a, y, unit.eyes, ml, eye_agg), eye_level(b, y, unit.eyes, ml, eye_agg)
            inputs.append((y, a, b, _clusters(unit, level)))
        cases = paired_bootstrap(lambda y, p: macro_metric(y, p, ml, p_metric), [i[0] for i in inputs],
                                 [i[1] for i in inputs], [i[2] for i in inputs], n_boot=n_boot,
                                 groups=[i[3] for i in inputs])
        out[level] = {"cases": {p_metric: cases.to_dict()}}
        if len(folds) > 1:
            out[level]["folds"] = {m: paired_test([x[level][m] for x in arm_entry["folds"]],
                                                  [x[level][m] for x in base_entry["folds"]], fold_test).to_dict()
                                   for m in metrics}
    return out


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{100 * stat['mean']:.2f}"
    return text if stat["std"] is None else f"{text} ± {100 * stat['std']:.2f}"


def _p_cell(summary: dict[str, Any], arm: str, level: str, which: str) -> str:
    if arm == summary["baseline"] or summary["baseline"] is None:
        return "—"
    sig = summary["arms"][arm]["significance"][level][which][summary["p_metric"]]
    if sig["p"] is None:
        return sig["stars"]
    # Two-sided tests: a star alone would read as "better"; say which way a significant difference goes.
    way = "" if sig["stars"] == "ns" or not sig.get("mean_diff") else (" ↑" if sig["mean_diff"] > 0 else " ↓")
    return f"{sig['stars']}{way} ({sig['p']:.2g})"


def _p_columns(summary: dict[str, Any]) -> list[str]:
    """The p columns, the stars' test first: `cases` (bootstrap over test cases), `folds` (with ≥ 2 folds)."""
    other = "folds" if summary["stars_from"] == "cases" else "cases"
    return [summary["stars_from"]] + ([other] if summary["tests"]["folds"] else [])


def markdown(summary: dict[str, Any]) -> str:
    """Table 2: one table per level, rows = arms, values ×100 as mean ± std over folds (or seeds)."""
    metrics = summary["metrics"]
    units, seeds = [s["fold"] for s in summary["splits"]], summary["seeds"]
    where = "the fixed split" if units == [None] else f"fold {units[0]}"  # cross-validation run on one fold
    spread = (f"mean ± std over {len(units)} folds, each fold's value the mean of its {seeds} seed(s)"
              if summary["spread_over"] == "folds" else f"mean ± std over {seeds} seed(s) on {where}")
    lines = [f"# Downstream classification ({summary['data']})", "",
             f"{summary['protocol']}: {spread}, ×100; metrics are macro-averaged over "
             f"{len(summary['class_names'])} classes ({'multi-label' if summary['multilabel'] else 'multi-class'})."]
    columns = _p_columns(summary)
    names = {"cases": "p (test cases)", "folds": "p (folds)"}
    for level in summary["levels"]:
        title = "Scan level" if level == "scan" else f"Eye level ({summary['eye_agg']} of each eye's scans)"
        lines += ["", f"## {title}", "",
                  "| Arm | " + " | ".join(COLUMNS[m] for m in metrics) + " | " + " | ".join(names[c] for c in columns)
                  + " |", "|---|" + "---:|" * len(metrics) + "---|" * len(columns)]
        for arm, entry in summary["arms"].items():
            cells = [_cell(entry["summary"][level][m]) for m in metrics]
            lines.append(f"| {arm} | " + " | ".join(cells) + " | "
                         + " | ".join(_p_cell(summary, arm, level, c) for c in columns) + " |")
    if summary["baseline"] is not None and len(summary["arms"]) > 1:
        whole = {"patients": "resampling patients whole (all their scans, or eyes at eye level)",
                 "eyes": "resampling eyes whole (all their scans)",
                 "cases": "resampling single cases"}[summary.get("bootstrap_resamples", "cases")]
        notes = {"cases": f"paired bootstrap of {COLUMNS[summary['p_metric']]} over the test cases, {whole} "
                          f"({summary['bootstrap']} replicates, seeds' scores averaged per case), "
                          "p from D = Δ/sd(Δ*) as pROC's bootstrap test",
                 "folds": f"{summary['tests']['folds']} of {COLUMNS[summary['p_metric']]} over the {len(units)} folds "
                          "(each the mean of its seeds)"}
        lines += ["", f"Against `{summary['baseline']}`; the stars come from {names[columns[0]]}. "
                      + "; ".join(f"{names[c]}: {notes[c]}" for c in columns)
                      + ". * < 0.05, ** < 0.01, *** < 0.001, **** < 0.0001, ns otherwise; ↑/↓: significantly "
                      "above/below the baseline."]
    return "\n".join(lines) + "\n"


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def table_csv(summary: dict[str, Any]) -> str:
    """One row per arm and level: mean and std of every metric (fractions, not ×100) and the p-values."""
    metrics, pm = summary["metrics"], summary["p_metric"]
    rows: list[list[Any]] = [["arm", "level", "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
                              "p_cases", "p_folds", "stars", "stars_from"]]
    for arm, entry in summary["arms"].items():
        for level in summary["levels"]:
            stats = entry["summary"][level]
            sig = entry["significance"].get(level, {})
            p = {k: sig.get(k, {}).get(pm, {}) for k in ("cases", "folds")}
            rows.append([arm, level, stats[metrics[0]]["n"], *(stats[m][s] for m in metrics for s in ("mean", "std")),
                         p["cases"].get("p"), p["folds"].get("p"), p[summary["stars_from"]].get("stars"),
                         summary["stars_from"]])
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


REPORT_FILES = ("table.md", "table.csv", "units.csv", "results.json")  # and a ROC_FILE per arm
ROC_FILE = re.compile(r"roc_[\w-]+\.png")


def roc_filename(arm: str) -> str:
    return "roc_" + re.sub(r"[^A-Za-z0-9_-]", "_", arm.replace("+", "plus_")) + ".png"


def check_report_out(out: Path, overwrite: bool) -> None:
    """`out` is new or empty, or (with `overwrite`) an earlier report holding nothing but a report's files, since
    writing the report replaces the whole folder."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    others = other_files(out, lambda p: p.name in REPORT_FILES or ROC_FILE.fullmatch(p.name) is not None)
    if others or not (out / "results.json").is_file():
        shown = f"other files ({few(others)})" if others else "no results.json"
        raise FileExistsError(f"--out {out}: holds {shown}; classify replaces an earlier report only: choose another "
                              "--out")
    if not overwrite:
        raise FileExistsError(f"{out} holds an earlier report; pass --overwrite to replace it or choose another --out")


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
    return {name: out / name for name in REPORT_FILES}
