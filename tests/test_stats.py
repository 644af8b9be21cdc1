"""The experiments' statistics: mean and std against closed forms, t quantiles against known values and an
independent fp64 integration, the paired interval against a hand computation, and verdicts that refuse to decide
when the interval does not allow it."""
from __future__ import annotations

import math

import pytest

from lorakit.experiments.stats import (at_least_verdict, format_mean_std, mean_std, paired_difference, parity_verdict,
                                       t_quantile_975)


def t_cdf(x: float, df: int, pieces: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 + the integral of Student's t density over [0, x] (Simpson's rule, fp64)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / pieces
    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, pieces))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df, known", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (19, 2.093),
                                       (29, 2.045), (30, 2.042)])
def test_t_quantiles_match_printed_tables(df, known):
    assert t_quantile_975(df) == pytest.approx(known, abs=5e-4)


@pytest.mark.parametrize("df", list(range(1, 31)) + [40, 60, 120])
def test_t_quantiles_have_cdf_0975(df):
    # An independent reference: integrate the density up to the tabled quantile. 3-decimal rounding of the
    # quantile moves the CDF by at most density * 5e-4 (< 1e-4 here); the large-df approximation by < 3e-4.
    assert t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=3e-4)


def test_bad_degrees_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


@pytest.mark.parametrize("values, mean, std", [
    ([1.0, 3.0], 2.0, math.sqrt(2)),                  # ((1-2)^2 + (3-2)^2) / (2-1) = 2
    ([1.0, 2.0, 3.0, 4.0], 2.5, math.sqrt(5 / 3)),    # (2.25 + 0.25 + 0.25 + 2.25) / 3
    ([7.0, 7.0, 7.0], 7.0, 0.0),                      # identical values: zero spread
    ([90.5], 90.5, None),                             # one value: the std is undefined, not 0
])
def test_mean_std_closed_forms(values, mean, std):
    got_mean, got_std = mean_std(values)
    assert got_mean == pytest.approx(mean)
    assert got_std is None if std is None else got_std == pytest.approx(std)


def test_mean_std_of_nothing_is_refused():
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_format_mean_std_prints_the_mean_alone_for_one_value():
    assert format_mean_std(*mean_std([1.0, 3.0])) == "2.00 ± 1.41"
    assert format_mean_std(*mean_std([90.5])) == "90.50"
    assert format_mean_std(-0.25, 0.5, digits=1, signed=True) == "-0.2 ± 0.5"
    assert format_mean_std(1.0, None, signed=True) == "+1.00"


def test_paired_difference_by_hand():
    ours = {0: 91.0, 1: 90.0, 2: 92.5}
    theirs = {0: 90.0, 1: 90.5, 2: 91.0, 7: 50.0}  # seed 7 has no partner and is left out
    d = paired_difference(ours, theirs)
    diffs = [1.0, -0.5, 1.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean_pp"] == pytest.approx(mean)
    assert (d["ci95_low_pp"], d["ci95_high_pp"]) == pytest.approx((mean - half, mean + half))
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_one_seed_gives_no_interval_and_no_verdict():
    d = paired_difference({0: 91.0}, {0: 90.0})
    assert d["ci95_low_pp"] is None and d["n"] == 1
    assert parity_verdict(d).startswith("not distinguishable at n = 1")
    assert at_least_verdict(d, -3.0).startswith("not distinguishable at n = 1")


def test_verdicts_only_where_the_interval_allows():
    equal = {"mean_pp": 0.1, "ci95_low_pp": -0.3, "ci95_high_pp": 0.4, "n": 5}
    wide = {"mean_pp": 0.1, "ci95_low_pp": -2.0, "ci95_high_pp": 2.2, "n": 3}
    apart = {"mean_pp": 2.0, "ci95_low_pp": 1.0, "ci95_high_pp": 3.0, "n": 3}
    assert parity_verdict(equal).startswith("equal within")
    assert parity_verdict(wide) == "not distinguishable at n = 3"
    assert parity_verdict(apart).startswith("different")
    assert at_least_verdict({"ci95_low_pp": -2.5, "ci95_high_pp": 0.5, "n": 3}, -3.0).startswith("met")
    assert at_least_verdict({"ci95_low_pp": -6.0, "ci95_high_pp": -3.5, "n": 3}, -3.0).startswith("missed")
    assert at_least_verdict({"ci95_low_pp": -4.0, "ci95_high_pp": -1.0, "n": 3}, -3.0).startswith("not distinguishable")


def test_paired_interval_of_two_seeds_in_closed_form():
    # differences 1 and 3: mean 2, sd sqrt(2), half-width t_{0.975, 1} * sqrt(2) / sqrt(2) = 12.706
    d = paired_difference({0: 11.0, 1: 13.0}, {0: 10.0, 1: 10.0})
    assert (d["mean_pp"], d["ci95_low_pp"], d["ci95_high_pp"]) == pytest.approx((2.0, 2.0 - 12.706, 2.0 + 12.706))


def _row(variant, init, seed, accuracy, rank=16):
    return {"variant": variant, "init": init, "rank": rank, "seed": seed, "accuracy": accuracy}


@pytest.mark.parametrize("clora, svd, verdict", [
    ([80.0, 81.0, 82.0], [79.0, 79.5, 80.5], "C-LoRA is better"),  # diffs 1.0, 1.5, 1.5
    ([80.0, 81.0, 82.0], [81.0, 82.2, 82.8], "SVD + fine-tune is better"),  # diffs -1.0, -1.2, -0.8
    ([80.0, 81.0, 82.0], [79.0, 82.0, 81.5], "not distinguishable at n = 3"),  # diffs 1.0, -1.0, 0.5
])
def test_clora_against_svd_is_the_paired_interval(clora, svd, verdict):
    """The compression tables' C-LoRA - SVD line: the paired differences, their mean and 95 % interval (t = 4.303
    at n = 3, written out here), and a verdict only where the interval excludes 0."""
    from lorakit.experiments.compress_report import clora_vs_svd

    rows = [_row("wds", "svd", s, a) for s, a in enumerate(clora)]
    rows += [_row("wds", "random", s, a - 5) for s, a in enumerate(clora)]  # a worse C-LoRA method: not chosen
    rows += [_row("svd+finetune", None, s, a) for s, a in enumerate(svd)]
    diffs = [c - v for c, v in zip(clora, svd)]
    mean = sum(diffs) / 3
    half = 4.303 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    [line] = clora_vs_svd(rows)
    assert line.startswith("- rank 16: wds (svd) ") and " vs svd+finetune " in line
    assert f"per seed {', '.join(f'{d:+.2f}' for d in diffs)} pp" in line
    assert f"mean {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] pp (95 % interval, n = 3)" in line
    assert f"**{verdict}" in line


def test_clora_against_svd_with_one_seed_gives_no_verdict():
    from lorakit.experiments.compress_report import clora_vs_svd

    [line] = clora_vs_svd([_row("bias", "svd", 0, 85.0), _row("asvd+finetune", None, 0, 84.0)])
    assert "mean +1.00 pp (95 % interval, n = 1): **one seed only: no verdict**" in line
