"""The evaluation's statistics: means of per-token values over windows clustered by document.

Windows of one document share text, so their tokens are not independent: every standard error
here is cluster-robust over documents, and every 95% interval a bootstrap that resamples whole
documents. A paired difference between two conditions is the mean of their per-token
differences on the same tokens.
"""

import math

import numpy as np

RESAMPLES = 2000  # bootstrap resamples of the documents: the interval's ends move < 1e-3 nats


def clustered_mean(values: np.ndarray, clusters: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean of ``values [N]``, its cluster-robust standard error, and a bootstrap 95% interval
    that resamples the ``clusters [N]`` (document ids) with replacement.

    The SE is the usual sandwich estimate with the ``G / (G - 1)`` small-sample factor; NaN
    with fewer than two clusters (as is the interval), and everything NaN with no values.
    """
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"mean": math.nan, "se": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    ids, groups = np.unique(clusters, return_inverse=True)
    sums = np.bincount(groups, weights=values)
    counts = np.bincount(groups).astype(np.float64)
    mean = float(values.mean())
    g = len(ids)
    if g < 2:
        se, ci = math.nan, [math.nan, math.nan]
    else:
        se = math.sqrt(g / (g - 1) * ((sums - counts * mean) ** 2).sum()) / values.size
        pick = np.random.default_rng(seed).integers(0, g, (RESAMPLES, g))
        boot = sums[pick].sum(1) / counts[pick].sum(1)
        ci = [float(x) for x in np.quantile(boot, [0.025, 0.975])]
    return {"mean": mean, "se": se, "ci95": ci, "n": int(values.size)}


def resolved(difference: dict[str, float]) -> bool:
    """Whether a difference is negative by more than two standard errors (False for a NaN SE)."""
    return difference["mean"] < -2 * difference["se"]


def gap_recovered(
    nll: dict[str, float], full_minus_window: dict[str, float], conditions: tuple[str, ...]
) -> dict[str, float]:
    """``(window - c) / (window - full)`` of each of ``conditions`` (their mean NLL in ``nll``).

    NaN unless ``full`` beats ``window`` by more than two standard errors of their paired
    difference: otherwise there is no gap the sample resolves, and the ratio of two noises means
    nothing (a gap of 0.0003 +- 0.0002 nats once printed as 1.654).
    """
    ok = resolved(full_minus_window)
    return {
        c: (nll["window"] - nll[c]) / -full_minus_window["mean"] if ok else math.nan
        for c in conditions
        if c in nll
    }


def ratio_interval(
    numerator: np.ndarray, denominator: np.ndarray, clusters: np.ndarray, seed: int = 0
) -> list[float]:
    """Bootstrap 95% interval of ``sum(numerator) / sum(denominator)`` (per-token values
    ``[N]``; ``gap_recovered`` is such a ratio of paired differences) that resamples whole
    ``clusters``; NaNs with fewer than two clusters or no values."""
    if len(numerator) == 0 or len(np.unique(clusters)) < 2:
        return [math.nan, math.nan]
    _, groups = np.unique(clusters, return_inverse=True)
    num = np.bincount(groups, weights=np.asarray(numerator, np.float64))
    den = np.bincount(groups, weights=np.asarray(denominator, np.float64))
    pick = np.random.default_rng(seed).integers(0, len(num), (RESAMPLES, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num[pick].sum(1) / den[pick].sum(1)
    return [float(x) for x in np.quantile(boot, [0.025, 0.975])]


def effective_window(budgets: list[int], window_nll: list[float], target: float) -> dict:
    """The budget W' at which ``window`` would score ``target`` NLL: interpolated linearly in
    log2 W between the first two budgets whose window NLLs bracket it.

    Returns ``{"value": W' or None, "bound": None | "below" | "above"}``: ``below`` when the
    target is worse than the window at the smallest budget, ``above`` when it is better than at
    the largest (the curve does not reach it), and no value where no two budgets bracket it.
    """
    order = np.argsort(budgets)
    w = np.log2(np.asarray(budgets, np.float64)[order])
    y = np.asarray(window_nll, np.float64)[order]
    if target >= y[0]:
        return {"value": None, "bound": "below"}
    for i in range(len(y) - 1):
        lo, hi = sorted((y[i], y[i + 1]))
        if lo <= target <= hi and y[i] != y[i + 1]:
            t = (y[i] - target) / (y[i] - y[i + 1])
            return {"value": float(2 ** (w[i] + t * (w[i + 1] - w[i]))), "bound": None}
    return {"value": None, "bound": "above"}
