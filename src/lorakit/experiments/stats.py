"""The statistics every experiment reports: mean ± std over seeds, and paired-by-seed differences with a 95 % interval.

One convention for a single value: its standard deviation is undefined, so :func:`mean_std` gives None (not 0), a
report prints the mean alone (:func:`format_mean_std`), and a paired difference over one seed has no interval.

Without scipy: the two-sided 95 % interval needs Student's t quantile t_{0.975, df}; the table below holds it for
df = 1..30 (to 3 decimals, as printed tables give it), and beyond 30 the normal approximation 1.96 + 2.4/df is
within 0.002 of the exact value. tests/test_stats.py checks every entry against a numerical
integration of the t density.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# t_{0.975, df} for df = 1..30 (two-sided 95 %).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """Student's t quantile at 0.975 for ``df`` degrees of freedom (df >= 1)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    return T_975[df - 1] if df <= len(T_975) else 1.96 + 2.4 / df


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(mean: float, std: float | None, digits: int = 2, signed: bool = False) -> str:
    """``"mean ± std"`` with ``digits`` decimals (``signed``: the mean with its sign); the mean alone when the std
    is None (a single value)."""
    text = f"{mean:{'+' if signed else ''}.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def paired_difference(ours: dict[int, float], theirs: dict[int, float]) -> dict:
    """``ours - theirs`` paired by seed (keys): ``{mean_pp, ci95_low_pp, ci95_high_pp, n, seeds}``.

    The interval is mean ± t_{0.975, n-1} * sd / sqrt(n) over the per-seed differences; with one seed it is
    undefined (None), with identical differences it has zero width.
    """
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(ours)} vs {sorted(theirs)}")
    diffs = [ours[s] - theirs[s] for s in seeds]
    mean, sd = mean_std(diffs)
    if sd is None:
        low = high = None
    else:
        half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return {"mean_pp": mean, "ci95_low_pp": low, "ci95_high_pp": high, "n": len(diffs), "seeds": seeds}


def parity_verdict(diff: dict, margin: float = 0.5) -> str:
    """Is ``diff`` (a :func:`paired_difference`) evidence of parity (|difference| <= ``margin`` pp)?

    "equal within ±margin" when the whole interval lies inside ±margin; "different" when it excludes 0 and
    lies outside ±margin entirely; otherwise "not distinguishable at n = ..." (the interval allows neither).
    """
    low, high, n = diff["ci95_low_pp"], diff["ci95_high_pp"], diff["n"]
    if low is None:
        return f"not distinguishable at n = {n} (no interval with one seed)"
    if -margin <= low and high <= margin:
        return f"equal within ±{margin:g} pp (95 % interval inside it)"
    if high < -margin or low > margin:
        return f"different: the 95 % interval excludes the ±{margin:g} pp band"
    return f"not distinguishable at n = {n}"


def at_least_verdict(diff: dict, bound: float) -> str:
    """Is the difference >= ``bound`` (e.g. LoRA - full >= -3 pp)? Met / missed only where the interval says so."""
    low, high, n = diff["ci95_low_pp"], diff["ci95_high_pp"], diff["n"]
    if low is None:
        return f"not distinguishable at n = {n} (no interval with one seed)"
    if low >= bound:
        return "met (the whole 95 % interval is above the bound)"
    if high < bound:
        return "missed (the whole 95 % interval is below the bound)"
    return f"not distinguishable at n = {n} (the interval straddles the bound)"
