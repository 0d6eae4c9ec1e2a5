"""Tests of atlasreg.evaluation.statistics.paired_bootstrap (paper Sec. 3.1, 'Statistical Analyses')."""

import math

import numpy as np
import pytest

from atlasreg.evaluation.statistics import nan_mean_std, paired_bootstrap


def test_identical_samples_are_not_significant():
    a = np.random.default_rng(1).normal(0.9, 0.05, 30)
    out = paired_bootstrap(a, a.copy(), n_boot=2000)
    assert out["mean_difference"] == 0.0 and out["ci_low"] == 0.0 and out["ci_high"] == 0.0
    assert out["significant"] is False and out["n"] == 30


def test_clear_improvement_is_significant_and_reproducible():
    rng = np.random.default_rng(2)
    b = rng.normal(0.8, 0.05, 30)
    a = b + 0.1 + rng.normal(0, 0.01, 30)
    out = paired_bootstrap(a, b)
    assert out["significant"] is True
    assert out["ci_low"] < out["mean_difference"] < out["ci_high"]
    assert out["mean_difference"] == pytest.approx(np.mean(a - b))
    assert 0.09 < out["ci_low"] and out["ci_high"] < 0.11
    assert out["p_value"] == 0.0
    assert paired_bootstrap(a, b) == out  # seeded
    # The reverse direction is not significant.
    assert paired_bootstrap(b, a)["significant"] is False


def test_lower_is_better_direction():
    rng = np.random.default_rng(3)
    hd_b = rng.normal(6.0, 1.0, 30)
    hd_a = hd_b - 0.5 + rng.normal(0, 0.05, 30)  # a has smaller distances: better
    out = paired_bootstrap(hd_a, hd_b, higher_is_better=False)
    assert out["significant"] is True and out["mean_difference"] > 0
    assert paired_bootstrap(hd_a, hd_b, higher_is_better=True)["significant"] is False


def test_interval_is_98_percent_percentile_interval():
    d = np.random.default_rng(4).normal(0.0, 1.0, 25)
    out = paired_bootstrap(d, np.zeros_like(d), n_boot=4000, alpha=0.01, seed=5)
    rng = np.random.default_rng(5)
    boot = d[rng.integers(0, 25, size=(4000, 25))].mean(1)
    assert out["ci_low"] == pytest.approx(np.quantile(boot, 0.01))
    assert out["ci_high"] == pytest.approx(np.quantile(boot, 0.99))


def test_nan_pairs_are_dropped():
    rng = np.random.default_rng(6)
    b = rng.normal(0.8, 0.05, 30)
    a = b + 0.1 + rng.normal(0, 0.01, 30)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[3], b_nan[7] = np.nan, np.nan
    out = paired_bootstrap(a_nan, b_nan, n_boot=1000)
    keep = np.ones(30, bool)
    keep[[3, 7]] = False
    assert out["n"] == 28
    assert out["mean_difference"] == pytest.approx(np.mean(a[keep] - b[keep]))
    assert out == paired_bootstrap(a[keep], b[keep], n_boot=1000)


def test_invalid_input():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], alpha=0.6)


def test_nan_mean_std_ignores_nan_and_reports_all_nan_as_nan():
    mean, std = nan_mean_std([1.0, float("nan"), 3.0])
    assert mean == 2.0 and std == 1.0
    assert all(math.isnan(v) for v in nan_mean_std([float("nan")]))
    assert all(math.isnan(v) for v in nan_mean_std([]))
