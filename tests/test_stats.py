"""Tests for modlens.core.stats: each statistic against an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as sps

from modlens.core import stats
from modlens.core.stats import (
    bates_cdf,
    benjamini_hochberg,
    effect_measure,
    effect_values,
    fisher,
    fisher_bates,
    percentiles,
)

# ----------------------------------------------------------------------------- percentiles


def test_percentiles_hand_cases_low_is_modular():
    # n = 4 randoms, grid (j + 0.5) / 5 = 0.1, 0.3, 0.5, 0.7, 0.9
    true = [1.0, 5.0, 3.0, 0.0]
    rand = [[2, 3, 4, 5], [1, 2, 3, 4], [1, 3, 3, 5], [0, 0, 0, 0]]
    got_mid = percentiles(true, rand, higher_is_modular=False)
    # randoms strictly lower (more modular): 0, 4, 1, 0; ties: 0, 0, 2, 4
    np.testing.assert_allclose(got_mid, [0.1, 0.9, (1 + 1 + 0.5) / 5, 0.5])
    got_orig = percentiles(true, rand, higher_is_modular=False, ties="original")
    np.testing.assert_allclose(got_orig, [0.1, 0.9, 0.3, 0.1])


def test_percentiles_hand_cases_high_is_modular():
    # accuracy drop: higher = more modular; randoms strictly higher count as more modular
    true = [5.0, 1.0, 3.0]
    rand = [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 1, 2]]
    np.testing.assert_allclose(percentiles(true, rand), [0.1, 0.9, (1 + 0.5 + 0.5) / 5])
    np.testing.assert_allclose(percentiles(true, rand, ties="original"), [0.1, 0.9, 0.3])
    # direction flip mirrors the percentile for continuous data
    np.testing.assert_allclose(percentiles(true, rand, higher_is_modular=False)[:2], [0.9, 0.1])


def test_percentiles_n19_range_and_all_ties():
    true = np.array([10.0, -10.0, 0.0])
    rand = np.vstack([np.zeros(19), np.zeros(19), np.zeros(19)])
    np.testing.assert_allclose(percentiles(true, rand), [0.025, 0.975, 0.5])
    np.testing.assert_allclose(percentiles(true, rand, ties="original"), [0.025, 0.975, 0.025])
    # all ties: every percentile exactly 0.5 under "mid"
    assert np.all(percentiles(np.ones(7), np.ones((7, 19))) == 0.5)


def test_percentiles_validation():
    with pytest.raises(ValueError, match=r"random_values.*\(1, 2\)|\(3,\)"):
        percentiles([1, 2, 3], [[1, 2]])
    with pytest.raises(ValueError, match=r"position \(1, 0\)"):
        percentiles([1, 2], [[1, 2], [np.nan, 2]])
    with pytest.raises(ValueError, match="position 1"):
        percentiles([1, np.nan], [[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="ties"):
        percentiles([1], [[1]], ties="max")
    with pytest.raises(ValueError):
        percentiles([1], np.empty((1, 0)))
    assert percentiles(np.empty(0), np.empty((0, 19))).shape == (0,)


def test_percentiles_uniform_on_grid_under_null():
    rng = np.random.default_rng(20211)
    m, n = 20000, 19
    true = rng.normal(size=m)
    rand = rng.normal(size=(m, n))
    pct = percentiles(true, rand)
    grid = (np.arange(n + 1) + 0.5) / (n + 1)
    idx = np.rint(pct * (n + 1) - 0.5).astype(int)
    np.testing.assert_allclose(pct, grid[idx])  # values on the grid
    counts = np.bincount(idx, minlength=n + 1)
    assert sps.chisquare(counts).pvalue > 1e-3
    # both tie rules agree when there are no ties
    np.testing.assert_array_equal(pct, percentiles(true, rand, ties="original"))


def test_percentiles_heavy_ties_mid_is_centred_original_is_anticonservative():
    rng = np.random.default_rng(7)
    m, n = 40000, 19
    true = rng.integers(0, 3, size=m).astype(float)
    rand = rng.integers(0, 3, size=(m, n)).astype(float)
    se = 0.3 / math.sqrt(m)
    for hm in (True, False):
        mid = percentiles(true, rand, higher_is_modular=hm)
        orig = percentiles(true, rand, higher_is_modular=hm, ties="original")
        assert abs(mid.mean() - 0.5) < 5 * se
        assert orig.mean() < 0.5 - 0.1  # ties favour modularity: shifted well below 0.5


# ----------------------------------------------------------------------------- fisher


def test_fisher_hand_case_and_scipy():
    stat, p = fisher([0.5])
    assert stat == pytest.approx(2 * math.log(2))
    assert p == pytest.approx(0.5)  # chi2(2) sf(x) = exp(-x/2)
    rng = np.random.default_rng(1)
    for size in (1, 3, 20, 200):
        pv = rng.uniform(1e-6, 1.0, size=size)
        ref = sps.combine_pvalues(pv, method="fisher")
        s, p = fisher(pv)
        assert s == pytest.approx(ref.statistic, rel=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=1e-10)
    assert fisher(np.full(10, 0.025))[1] < 1e-6 < fisher(np.full(10, 0.975))[1]


def test_fisher_validation():
    for bad in ([], [0.0, 0.5], [1.5], [np.nan]):
        with pytest.raises(ValueError):
            fisher(bad)
    s, p = fisher([1.0, 1.0])
    assert (s, p) == (0.0, 1.0) and math.copysign(1.0, s) == 1.0


# ----------------------------------------------------------------------------- bates


def test_bates_known_values():
    assert bates_cdf(0.5, 5) == 0.5
    assert bates_cdf(0.2, 5) == pytest.approx(1 / 120, rel=1e-14)
    assert bates_cdf(0.1, 5) == pytest.approx(1 / 3840, rel=1e-14)  # 0.5^5 / 5!
    assert bates_cdf(0.1, 5) == pytest.approx(2.6e-4, rel=0.01)
    for v in (0.0, 0.1, 0.37, 0.9, 1.0):
        assert bates_cdf(v, 1) == v
    assert bates_cdf(-0.3, 5) == 0.0 and bates_cdf(1.2, 5) == 1.0
    # n = 2: triangular distribution
    assert bates_cdf(0.25, 2) == pytest.approx(0.125)
    assert bates_cdf(0.75, 2) == pytest.approx(0.875)


@pytest.mark.parametrize("n", [2, 3, 5, 12, 30, 50, 200])
def test_bates_matches_scipy_irwinhall_symmetric_monotone(n):
    vs = np.linspace(0.0, 1.0, 201)
    got = np.array([bates_cdf(v, n) for v in vs])
    ref = sps.irwinhall(n).cdf(n * vs)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)
    assert np.all((got >= 0) & (got <= 1))
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_allclose(got, 1 - got[::-1], atol=1e-15)


@pytest.mark.parametrize("n", [3, 5, 30])
def test_bates_against_monte_carlo(n):
    rng = np.random.default_rng(100 + n)
    draws = 200_000
    means = rng.random((draws, n)).mean(axis=1)
    for v in (0.2, 0.35, 0.45, 0.5, 0.6, 0.8):
        f = bates_cdf(v, n)
        emp = np.mean(means <= v)
        se = math.sqrt(max(f * (1 - f), 1e-12) / draws)
        assert abs(emp - f) <= 5 * se + 1e-5, (v, f, emp)


def test_bates_large_n_edgeworth_branch():
    n = stats.BATES_EXACT_MAX_N
    for v in (0.45, 0.48, 0.49, 0.499, 0.5, 0.51):
        assert stats._bates_edgeworth(v, n) == pytest.approx(bates_cdf(v, n), abs=1e-7)
    vals = [bates_cdf(v, 5000) for v in np.linspace(0, 1, 101)]
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(vals, vals[1:]))
    assert bates_cdf(0.5, 5000) == pytest.approx(0.5)


def test_bates_validation():
    for bad_n in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            bates_cdf(0.5, bad_n)
    with pytest.raises(ValueError):
        bates_cdf(float("nan"), 5)
    assert bates_cdf(np.float64(0.2), np.int64(5)) == pytest.approx(1 / 120)


# ----------------------------------------------------------------------------- fisher_bates


def test_fisher_bates_basic():
    assert fisher_bates([0.037]) == 0.037
    assert fisher_bates([0.2] * 5) == pytest.approx(1 / 120)
    assert fisher_bates([0.5, 0.5]) == 0.5
    for bad in ([], [1.2], [np.nan, 0.1]):
        with pytest.raises(ValueError):
            fisher_bates(bad)


def test_fisher_bates_uniform_under_null():
    rng = np.random.default_rng(5)
    pv = rng.random((4000, 5))
    fb = np.array([fisher_bates(row) for row in pv])
    assert sps.kstest(fb, "uniform").pvalue > 1e-3


# ----------------------------------------------------------------------------- BH


def _bh_critical_bruteforce(p, alpha):
    p = np.sort(p[~np.isnan(p)])
    m = p.size
    ok = [p[j - 1] for j in range(1, m + 1) if p[j - 1] <= j * alpha / m]
    return max(ok) if ok else 0.0


def test_bh_against_scipy_and_bruteforce():
    rng = np.random.default_rng(11)
    for size in (1, 2, 7, 50, 300):
        p = np.concatenate([rng.random(size), rng.random(size) * 1e-3])
        rng.shuffle(p)
        q, rej, crit = benjamini_hochberg(p, alpha=0.05)
        np.testing.assert_allclose(q, sps.false_discovery_control(p, method="bh"), rtol=1e-12)
        np.testing.assert_array_equal(rej, q <= 0.05)
        assert crit == _bh_critical_bruteforce(p, 0.05)
        np.testing.assert_array_equal(rej, p <= crit if crit > 0 else np.zeros_like(rej))
        assert np.all(np.diff(q[np.argsort(p)]) >= 0) and np.all(q <= 1)


def test_bh_hand_case():
    # m = 4, thresholds j * 0.05 / 4 = 0.0125, 0.025, 0.0375, 0.05
    p = [0.04, 0.001, 0.025, 0.9]
    q, rej, crit = benjamini_hochberg(p)
    assert crit == 0.025
    np.testing.assert_array_equal(rej, [False, True, True, False])
    np.testing.assert_allclose(q, [0.04 * 4 / 3, 0.004, 0.05, 0.9])
    # a step-up case: p_(1) alone fails its threshold, but p_(2) passes
    q, rej, crit = benjamini_hochberg([0.02, 0.024])
    assert crit == 0.024 and rej.all()
    q, rej, crit = benjamini_hochberg([0.5, 0.9])
    assert crit == 0.0 and not rej.any()


def test_bh_nan_handling():
    p = np.array([0.01, np.nan, 0.04, 0.2])
    q, rej, crit = benjamini_hochberg(p)
    assert np.isnan(q[1]) and not rej[1]
    ref = sps.false_discovery_control(p[[0, 2, 3]], method="bh")
    np.testing.assert_allclose(q[[0, 2, 3]], ref)
    assert crit == 0.01  # m = 3: 0.01 <= 0.05/3, 0.04 > 0.1/3
    q, rej, crit = benjamini_hochberg([np.nan, np.nan])
    assert np.isnan(q).all() and not rej.any() and crit == 0.0
    for bad in ([1.5], [-0.1]):
        with pytest.raises(ValueError):
            benjamini_hochberg(bad)
    with pytest.raises(ValueError):
        benjamini_hochberg([0.1], alpha=0.0)


# ----------------------------------------------------------------------------- effects


def test_effect_values_paper_rule():
    x = [1.0, 1.0, 0.0, 0.0, 3.0, -1.0, 2.0, -2.0, 3.0, -3.0, -1.0, 0.0, -1.0]
    mu = [1.0, 3.0, 0.0, 2.0, -1.0, 3.0, -2.0, 2.0, -5.0, 1.0, -1.0, -2.0, 0.0]
    expect = [
        1.0,  # equal
        0.5,  # 2/4
        1.0,  # 0/0: nothing changed, neutral
        0.0,  # x = 0 < mu
        2.0,  # x > 0 > mu (raw 6/2 = 3)
        0.0,  # x < 0 < mu: an accuracy gain is no importance (raw -2/2 -> 0, footnote 9)
        2.0,  # x + mu == 0, x > 0
        0.0,  # x + mu == 0, x < 0
        2.0,  # x > 0 > x + mu: true drop, random gain (raw 6/-2 -> 0 under the plain clamp)
        0.0,  # x < 0 < mu, x + mu < 0: the audit's case (raw -6/-2 = 3 -> 2 under the plain clamp)
        1.0,  # both negative, equal
        1.0,  # x = 0 > mu: nothing dropped on either side
        1.0,  # x < 0 = mu
    ]
    np.testing.assert_allclose(effect_values(x, mu), expect)


def test_effect_values_paper_rule_properties():
    rng = np.random.default_rng(0)
    # the paper's formula where x, mu >= 0 (independent reference: the plain expression)
    x, mu = rng.exponential(size=500), rng.exponential(size=500)
    np.testing.assert_allclose(effect_values(x, mu), 2 * x / (x + mu), rtol=1e-15)
    # equal to 1 at x = mu, for every sign
    v = rng.normal(size=200) * 10.0 ** rng.integers(-8, 3, size=200)
    np.testing.assert_array_equal(effect_values(v, v), np.ones(200))
    # in [0, 2] and monotone non-decreasing in x for fixed mu, negatives included
    grid = np.linspace(-5, 5, 1001)
    for m in (-3.0, -1e-9, 0.0, 1e-9, 0.7, 4.0):
        got = effect_values(grid, np.full_like(grid, m))
        assert np.all((got >= 0) & (got <= 2))
        assert np.all(np.diff(got) >= 0), m
        # an accuracy gain (x < 0) never scores above neutral
        assert np.all(got[grid < 0] <= 1.0)


def test_effect_values_original_lesion_rule():
    x = [1.0, 3.0, 0.0, -1.0, 2.0, 1.0, 0.0]
    mu = [1.0, -1.0, 0.0, -1.0, 0.0, 3.0, 2.0]
    np.testing.assert_allclose(effect_values(x, mu, rule="original_lesion"), [1.0, 0, 0, 0, 0, 0.5, 0])


def test_effect_values_validation():
    with pytest.raises(ValueError, match="shape"):
        effect_values([1, 2], [1])
    with pytest.raises(ValueError, match="position 0"):
        effect_values([np.nan], [1])
    with pytest.raises(ValueError, match="rule"):
        effect_values([1], [1], rule="x")


def test_effect_measure():
    vals = np.random.default_rng(3).uniform(0, 2, size=37)
    mean, se = effect_measure(vals)
    assert mean == pytest.approx(vals.mean())
    assert se == pytest.approx(sps.sem(vals))
    assert effect_measure([1.2, 0.8]) == pytest.approx((1.0, 0.2))
    m1, s1 = effect_measure([1.3])
    assert m1 == 1.3 and math.isnan(s1)
    assert all(math.isnan(t) for t in effect_measure([]))


# ----------------------------------------------------------------------------- purity


def test_module_imports_no_heavy_frameworks():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(stats.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names <= {"__future__", "math", "numpy", "scipy"}, names
