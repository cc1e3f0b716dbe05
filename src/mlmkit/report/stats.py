"""Paired statistics for the ablation report: descriptive stats and paired differences with a
95% Student-t interval (no scipy needed)."""

from __future__ import annotations

import math

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher
# expansion around the normal quantile (error < 1e-5 for df > 30).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the multiplier of the standard error in a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def describe(values: list[float]) -> dict:
    """n, mean, sample sd (n-1; None for n < 2), min, max of finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def paired_difference(arm: dict[int, float], reference: dict[int, float]) -> dict:
    """Per-seed differences arm - reference over the seeds both have, with a 95% t-interval.

    Returns n, mean, sd, se, t, ci95 ([low, high], None for n < 2), per_seed {seed: d}.
    """
    seeds = sorted(set(arm) & set(reference))
    diffs = {s: arm[s] - reference[s] for s in seeds
             if arm[s] is not None and reference[s] is not None}
    stats = describe(list(diffs.values()))
    out = {"n": stats["n"], "mean": stats["mean"], "sd": stats["sd"], "se": None, "t": None,
           "ci95": None, "per_seed": {str(s): d for s, d in diffs.items()}}
    if stats["n"] >= 2:
        se = stats["sd"] / math.sqrt(stats["n"])
        t = t_quantile_975(stats["n"] - 1)
        out.update(se=se, t=t, ci95=[stats["mean"] - t * se, stats["mean"] + t * se])
    return out


def per_seed(runs: dict, fn) -> dict[int, float]:
    """``fn`` of each seed's run (``runs``: seed -> run), where it has a value."""
    return {s: v for s, r in runs.items() if (v := fn(r)) is not None}


def seed_stats(values: dict[int, float]) -> dict:
    """`describe` of the values, and the values per seed."""
    return {**describe(list(values.values())),
            "per_seed": {str(s): v for s, v in sorted(values.items())}}
