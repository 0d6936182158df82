"""Paired significance of an arm against the baseline: over folds (seeds averaged within each), or a bootstrap over
test cases (seeds' scores averaged per case). Seeds are never counted as independent units: they share the data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

TESTS = ("auto", "ttest", "wilcoxon", "bootstrap")
TEST_NAMES = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test", "bootstrap": "paired bootstrap"}
# The tests over folds (the others resample test cases).
FOLD_TESTS = ("ttest", "wilcoxon")
_STARS = ((1e-4, "****"), (1e-3, "***"), (1e-2, "**"), (5e-2, "*"))


def stars(p: float) -> str:
    """The paper's significance marks: * < 0.05, ** < 0.01, *** < 0.001, **** < 0.0001; 'ns' otherwise."""
    if not np.isfinite(p):
        return "n/a"
    return next((mark for bound, mark in _STARS if p < bound), "ns")


@dataclass
class PairedResult:
    """Two-sided p-value of arm vs baseline, the test used, the number of matched units and the mean difference."""

    p: float
    test: str
    n: int
    mean_diff: float

    @property
    def stars(self) -> str:
        return stars(self.p)

    def to_dict(self) -> dict:
        return {"p": None if not np.isfinite(self.p) else self.p, "stars": self.stars, "test": TEST_NAMES[self.test],
                "n": self.n, "mean_diff": None if not np.isfinite(self.mean_diff) else self.mean_diff}


def paired_test(arm: Sequence[float], base: Sequence[float], test: str = "ttest") -> PairedResult:
    """Paired t-test or Wilcoxon signed-rank test over matched units (folds); NaN pairs are dropped."""
    if test not in ("ttest", "wilcoxon"):
        raise ValueError(f"paired_test runs ttest or wilcoxon, not {test!r}")
    a, b = np.asarray(arm, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    mean_diff = float(d.mean()) if n else float("nan")
    if n < 2:
        return PairedResult(float("nan"), test, n, mean_diff)
    if np.all(d == 0):  # both tests are undefined for identical arms; no evidence of a difference
        return PairedResult(1.0, test, n, mean_diff)
    if test == "ttest":
        p = stats.ttest_rel(a[keep], b[keep]).pvalue
    else:
        p = stats.wilcoxon(a[keep], b[keep]).pvalue
    return PairedResult(float(p), test, n, mean_diff)


Metric = Callable[[np.ndarray, np.ndarray], float]


def paired_bootstrap(metric: Metric, labels: Sequence[np.ndarray], arm: Sequence[np.ndarray],
                     base: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0,
                     groups: Sequence[np.ndarray | None] | None = None) -> PairedResult:
    """Bootstrap over test cases of the mean (over folds) metric difference arm − base.

    ``labels[f]``, ``arm[f]`` and ``base[f]`` are fold f's test labels and both arms' scores on the same cases. Each
    replicate resamples every fold's cases with replacement, the same draw for both arms (that is the pairing). With
    ``groups[f]`` (a patient id per case) it resamples patients and keeps each one's cases together: scans of one
    eye or patient are not independent, and resampling them one by one shrinks sd(Δ*) and inflates the stars. The
    two-sided p-value is pROC's bootstrap test (`roc.test(method="bootstrap")`): D = Δ / sd(Δ*) against N(0, 1), so
    it is not floored at 1/n_boot as a percentile p-value would be.
    """
    if not len(labels) == len(arm) == len(base) or not labels:
        raise ValueError("paired_bootstrap needs the same, non-zero number of label, arm and base arrays")
    groups = list(groups) if groups is not None else [None] * len(labels)
    if len(groups) != len(labels) or any(g is not None and len(g) != len(y) for g, y in zip(groups, labels,
                                                                                             strict=True)):
        raise ValueError("paired_bootstrap needs one group id per test case of every fold")
    members = [None if g is None else _members(g) for g in groups]
    rng = np.random.default_rng(seed)
    observed = float(np.nanmean([metric(y, a) - metric(y, b) for y, a, b in zip(labels, arm, base, strict=True)]))
    deltas = []
    for _ in range(n_boot):
        diffs = []
        for y, a, b, m in zip(labels, arm, base, members, strict=True):
            idx = rng.integers(0, len(y), len(y)) if m is None else \
                np.concatenate([m[k] for k in rng.integers(0, len(m), len(m))])
            diffs.append(metric(y[idx], a[idx]) - metric(y[idx], b[idx]))
        deltas.append(np.nanmean(diffs) if np.isfinite(diffs).any() else np.nan)
    d = np.asarray(deltas)
    d = d[np.isfinite(d)]
    n_cases = sum(len(y) if m is None else len(m) for y, m in zip(labels, members, strict=True))  # resampled units
    if len(d) < 2 or not np.isfinite(observed):
        return PairedResult(float("nan"), "bootstrap", n_cases, observed)
    sd = float(d.std(ddof=1))
    if sd == 0:  # the arms agree on every resample: no evidence of a difference
        return PairedResult(1.0, "bootstrap", n_cases, observed)
    return PairedResult(float(2 * stats.norm.sf(abs(observed) / sd)), "bootstrap", n_cases, observed)


def _members(groups: np.ndarray) -> list[np.ndarray]:
    """The case indices of each group, in sorted group order."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])
