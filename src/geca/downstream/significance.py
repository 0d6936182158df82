"""Paired significance of an arm against the baseline: over matched units, or a bootstrap over test cases."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

TESTS = ("auto", "ttest", "wilcoxon", "bootstrap")
TEST_NAMES = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test", "bootstrap": "paired bootstrap"}
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
    """Paired t-test or Wilcoxon signed-rank test over matched units (folds × seeds); NaN pairs are dropped."""
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
                     base: Sequence[np.ndarray], test_sets: Sequence[Hashable] | None = None, n_boot: int = 1000,
                     seed: int = 0) -> PairedResult:
    """Bootstrap over test cases of the mean (over units) metric difference arm − base.

    ``labels[u]``, ``arm[u]`` and ``base[u]`` are unit u's test labels and both arms' scores on the same cases.
    Each replicate resamples every unit's cases with replacement (the same draw for both arms: that is the
    pairing); units with the same ``test_sets`` key (seeds of one split or fold) share the draw, units default to
    a test set each. The two-sided p-value is
    ``2·min(P(Δ* ≤ 0), P(Δ* ≥ 0))`` with the +1 correction, so its floor is about 2 / (n_boot + 1).
    """
    if not len(labels) == len(arm) == len(base) or not labels:
        raise ValueError("paired_bootstrap needs the same, non-zero number of label, arm and base arrays")
    rng = np.random.default_rng(seed)
    observed = float(np.nanmean([metric(y, a) - metric(y, b) for y, a, b in zip(labels, arm, base, strict=True)]))
    keys = list(range(len(labels))) if test_sets is None else list(test_sets)
    if len(keys) != len(labels):
        raise ValueError(f"test_sets has {len(keys)} keys for {len(labels)} units")
    deltas = []
    for _ in range(n_boot):
        draws: dict[Hashable, np.ndarray] = {}
        diffs = []
        for key, y, a, b in zip(keys, labels, arm, base, strict=True):
            if key not in draws:
                draws[key] = rng.integers(0, len(y), len(y))
            idx = draws[key]
            if len(idx) != len(y):
                raise ValueError(f"units sharing test set {key!r} differ in size: {len(idx)} vs {len(y)}")
            diffs.append(metric(y[idx], a[idx]) - metric(y[idx], b[idx]))
        deltas.append(np.nanmean(diffs) if np.isfinite(diffs).any() else np.nan)
    d = np.asarray(deltas)
    d = d[np.isfinite(d)]
    if not len(d):
        return PairedResult(float("nan"), "bootstrap", len(labels), observed)
    low, high = (np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1)
    return PairedResult(float(min(1.0, 2 * min(low, high))), "bootstrap", len(labels), observed)
