"""Classification metrics of Table 2: per class and macro, at scan or eye level.

Sensitivity, specificity, F1 and F1_sen/spe come from thresholded decisions (0.5 for multi-label, the argmax for
multi-class, scored one-vs-rest); AUC and AP from the scores. A per-class value that is undefined on the data at
hand (e.g. sensitivity of a class with no positives) is NaN and left out of the macro mean, so a class absent from
one fold's test set does not count as a failure.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from geca.errors import DataError

PER_CLASS = ("sen", "spe", "auc", "f1", "f1_sen_spe", "ap")
# Macro names: mAP is the macro mean of per-class AP; acc exists for multi-class data only.
MACRO = ("sen", "spe", "auc", "f1", "f1_sen_spe", "map", "acc")
AGGREGATIONS = ("max", "mean")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def decisions(probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> np.ndarray:
    """0/1 predictions (N, K): scores ≥ threshold per label, or the one-hot argmax for multi-class."""
    if multilabel:
        return (probs >= threshold).astype(np.int64)
    return np.eye(probs.shape[1], dtype=np.int64)[probs.argmax(1)]


def _check(labels: np.ndarray, probs: np.ndarray) -> None:
    if labels.shape != probs.shape or labels.ndim != 2:
        raise DataError(f"labels {labels.shape} and scores {probs.shape} must both be (N, K)")
    if len(labels) == 0:
        raise DataError("cannot score an empty set")
    if not np.isfinite(probs).all():
        raise DataError("scores contain NaN or infinity (did training diverge?)")


def binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half): equal to scikit-learn's ``roc_auc_score``.

    Hand-written because scikit-learn's input checks cost milliseconds per call and the bootstrap makes ~10^5.
    """
    y = np.asarray(y, dtype=bool)  # 0/1 integers would index ranks by position
    pos = y.sum()
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((rankdata(p)[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def binary_ap(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision Σ (R_n − R_{n−1}) P_n over distinct thresholds: scikit-learn's definition, without its
    per-call overhead (see :func:`binary_auc`)."""
    y = np.asarray(y, dtype=bool)  # float32 0/1 labels would count in float32
    pos = y.sum()
    if pos == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ps, tps = p[order], np.cumsum(y[order])
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # the last index of every run of tied scores
    tp = tps[last]
    precision, recall = tp / (last + 1), tp / pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _threshold_metrics(y: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float
                       ) -> dict[str, np.ndarray]:
    pred = decisions(probs, multilabel, threshold) > 0
    tp, fp = (pred & y).sum(0), (pred & ~y).sum(0)
    fn, tn = (~pred & y).sum(0), (~pred & ~y).sum(0)
    sen, spe = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    with np.errstate(invalid="ignore", divide="ignore"):
        hm = 2 * sen * spe / (sen + spe)  # NaN stays NaN: undefined sen or spe leaves the mean undefined
    hm[sen + spe == 0] = 0.0
    return {"sen": sen, "spe": spe, "f1": _ratio(2 * tp, 2 * tp + fp + fn), "f1_sen_spe": hm}


def _inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, probs = np.asarray(labels) > 0.5, np.asarray(probs, dtype=np.float64)
    _check(y, probs)
    return y, probs


def per_class(labels: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float = 0.5
              ) -> dict[str, np.ndarray]:
    """Every per-class metric as a (K,) array; NaN where the class makes it undefined."""
    y, probs = _inputs(labels, probs)
    out = _threshold_metrics(y, probs, multilabel, threshold)
    out["auc"] = np.array([binary_auc(y[:, k], probs[:, k]) for k in range(y.shape[1])])
    out["ap"] = np.array([binary_ap(y[:, k], probs[:, k]) for k in range(y.shape[1])])
    return {name: out[name] for name in PER_CLASS}


def macro_metric(labels: np.ndarray, probs: np.ndarray, multilabel: bool, name: str, threshold: float = 0.5
                 ) -> float:
    """One macro metric, computing only what it needs (the bootstrap calls this many times)."""
    y, probs = _inputs(labels, probs)
    if name == "acc":
        return float(np.mean(probs.argmax(1) == y.argmax(1)))
    if name in ("auc", "map"):
        fn = binary_auc if name == "auc" else binary_ap
        return _nanmean(np.array([fn(y[:, k], probs[:, k]) for k in range(y.shape[1])]))
    if name not in MACRO:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(MACRO)}")
    return _nanmean(_threshold_metrics(y, probs, multilabel, threshold)[name])


def _nanmean(x: np.ndarray) -> float:
    return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")


def macro(classes: dict[str, np.ndarray]) -> dict[str, float]:
    """Macro means over the classes where each metric is defined (mAP is the mean AP)."""
    out = {name: _nanmean(classes[name]) for name in PER_CLASS if name != "ap"}
    out["map"] = _nanmean(classes["ap"])
    return out


def score(labels: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> dict:
    """Macro metrics (plus accuracy for multi-class) and the per-class arrays they come from.

    For multi-class data the macro AUC is MedMNIST's ``getAUC``: the mean over classes of the one-vs-rest AUC of
    the softmax scores, and ``acc`` is MedMNIST's ``getACC`` (argmax accuracy).
    """
    classes = per_class(labels, probs, multilabel, threshold)
    result = macro(classes)
    if not multilabel:
        result["acc"] = float(np.mean(np.asarray(probs).argmax(1) == np.asarray(labels).argmax(1)))
    return {"macro": result, "per_class": classes}


def aggregate_groups(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, how: str = "max"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eye-level scores: each group's (eye's) scan scores combined by max or mean, its labels OR-ed.

    Returns (probs, labels, group keys), one row per group in sorted key order.
    """
    if how not in AGGREGATIONS:
        raise DataError(f"unknown eye aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
    groups = np.asarray(groups).astype(str)
    if groups.shape != (len(probs),):
        raise DataError(f"need one group id per scan: {groups.shape} ids for {len(probs)} scans")
    keys, inverse = np.unique(groups, return_inverse=True)
    agg_labels = np.zeros((len(keys), labels.shape[1]))
    np.maximum.at(agg_labels, inverse, np.asarray(labels, dtype=np.float64))
    if how == "max":
        agg = np.full((len(keys), probs.shape[1]), -np.inf)
        np.maximum.at(agg, inverse, np.asarray(probs, dtype=np.float64))
    else:
        agg = np.zeros((len(keys), probs.shape[1]))
        np.add.at(agg, inverse, np.asarray(probs, dtype=np.float64))
        agg /= np.bincount(inverse, minlength=len(keys))[:, None]
    return agg, agg_labels, keys


def eye_level(probs: np.ndarray, labels: np.ndarray, eyes: np.ndarray, multilabel: bool, how: str = "max"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Aggregated (probs, labels) per eye; multi-class data must have one class per eye to stay multi-class."""
    agg, agg_labels, keys = aggregate_groups(probs, labels, eyes, how)
    if not multilabel and (mixed := _first_mixed(agg_labels, keys)) is not None:
        raise DataError(f"eye {mixed!r} has scans of different classes; eye-level scoring of multi-class data needs "
                        "one class per eye")
    return agg, agg_labels


def mixed_eye(labels: np.ndarray, eyes: np.ndarray) -> str | None:
    """The first eye (in sorted order) whose scans carry different one-hot classes, or None."""
    _, agg_labels, keys = aggregate_groups(np.asarray(labels, dtype=np.float64), labels, eyes)
    return _first_mixed(agg_labels, keys)


def _first_mixed(agg_labels: np.ndarray, keys: np.ndarray) -> str | None:
    """Of eyes' OR-ed one-hot labels, the first eye holding other than one class."""
    mixed = np.flatnonzero(agg_labels.sum(1) != 1)
    return str(keys[mixed[0]]) if len(mixed) else None
