"""combine="exact": the conditional permutation null of Fisher's statistic (modlens.core.permutation).

Checked against brute-force enumeration, Monte Carlo and hand cases; calibrated on simulated null
networks; more powerful than the paper's Fisher-chi2 on weakly planted modules.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from modlens.analysis import AnalysisConfig
from modlens.core import permutation as P
from modlens.core.stats import fisher, fisher_bates, percentiles

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def _network(rng, m, n, levels=None):
    v = rng.integers(0, levels, size=(m, n + 1)).astype(float) if levels else rng.normal(size=(m, n + 1))
    return list(P.null_percentiles(v)), percentiles(v[:, 0], v[:, 1:])


def _brute(nulls, obs, stat=None):
    """P(T >= t_obs) by listing every configuration (each null percentile equally likely)."""
    t = fisher(obs)[0] if stat is None else stat
    hits = [(-2 * np.sum(np.log(c))) >= t - 1e-9 for c in itertools.product(*nulls)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- hand cases


def test_all_tied_gives_one():
    q = P.null_percentiles(np.ones(20))
    assert np.all(q == 0.5)
    for method in ("auto", "enumeration", "lattice", "monte_carlo"):
        r = P.fisher_exact([q], [0.5], method=method)
        assert r.p_value == 1.0 and r.method == "trivial"
    # a tied subcluster next to a varying one changes nothing
    q2 = P.null_percentiles(np.arange(10.0)[::-1])
    assert P.fisher_exact([q, q2], [0.5, q2[0]]).p_value == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("n", [1, 4, 9, 19, 99])
def test_one_subcluster_best_rank_gives_one_over_n_plus_one(n):
    values = np.r_[100.0, np.arange(n, dtype=float)]  # true value the largest: best rank (high = modular)
    q = P.null_percentiles(values)
    obs = percentiles(values[:1], values[None, 1:])
    assert obs[0] == pytest.approx(0.5 / (n + 1))
    for method in ("auto", "enumeration", "lattice"):
        assert P.fisher_exact([q], obs, method=method).p_value == pytest.approx(1 / (n + 1), rel=1e-12)
    mc = P.fisher_exact([q], obs, method="monte_carlo", n_draws=20_000, random_state=1)
    assert abs(mc.p_value - 1 / (n + 1)) < 4 * mc.standard_error + 1e-4


def test_null_percentiles_rule_matches_observed_and_validation():
    v = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    for ties in ("mid", "original"):
        for hm in (True, False):
            q = P.null_percentiles(v, higher_is_modular=hm, ties=ties)
            each = [percentiles([v[j]], np.delete(v, j)[None, :], higher_is_modular=hm, ties=ties)[0] for j in range(5)]
            np.testing.assert_allclose(q, np.sort(each))
    with pytest.raises(ValueError, match="not one of its null percentiles"):
        P.fisher_exact([[0.1, 0.3, 0.5]], [0.2])
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        P.fisher_exact([[0.0, 0.5]], [0.5])
    with pytest.raises(ValueError, match="2 null percentile sets for 1"):
        P.fisher_exact([[0.5], [0.5]], [0.5])
    with pytest.raises(ValueError, match="method"):
        P.fisher_exact([[0.25, 0.75]], [0.25], method="chi2")


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("case", range(6))
def test_enumeration_and_lattice_against_brute_force(case):
    rng = np.random.default_rng(100 + case)
    m, n, levels = [(3, 4, None), (4, 3, 2), (2, 9, 3), (4, 4, None), (3, 6, 3), (5, 2, None)][case]
    nulls, obs = _network(rng, m, n, levels)
    if case == 5:  # mixed numbers of random sets
        nulls[0] = P.null_percentiles([2.0, 1.0, 0.5, 3.0, 1.0, 2.5])
        obs[0] = percentiles([2.0], [[1.0, 0.5, 3.0, 1.0, 2.5]])[0]
    ref = _brute(nulls, obs)
    exact = P.fisher_exact(nulls, obs, method="enumeration")
    assert exact.p_value == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert P.fisher_exact(nulls, obs).method == "enumeration"  # auto enumerates small cases
    lat = P.fisher_exact(nulls, obs, method="lattice")
    lo, hi = lat.p_bounds
    assert lo - 1e-12 <= ref <= hi + 1e-12
    # the lattice p value is exactly that of the statistic on the lattice: 2 ln p rounded to a
    # multiple of h for each prime p, summed over the prime factors of every numerator a = q 2(n+1)
    h = lat.resolution

    def lattice_2ln(a):
        total, p = 0, 2
        while a > 1:
            while a % p == 0:
                total, a = total + round(2 * np.log(p) / h), a // p
            p += 1
        return total

    def lattice_sum(config):
        return sum(lattice_2ln(int(round(c * 2 * len(q)))) for c, q in zip(config, nulls))

    k_obs = lattice_sum(obs)
    rounded = np.mean([lattice_sum(c) <= k_obs for c in itertools.product(*nulls)])
    assert lat.p_value == pytest.approx(rounded, rel=1e-10)
    # exact ties of the statistic stay ties on this lattice: here it gives the exact p value
    assert lat.p_value == pytest.approx(ref, rel=1e-9)


def test_lattice_against_monte_carlo_and_coarse_lattice():
    rng = np.random.default_rng(5)
    for levels in (None, 3):
        nulls, obs = _network(rng, 30, 19, levels)
        lat = P.fisher_exact(nulls, obs)
        assert lat.method == "lattice"
        assert lat.p_bounds[0] <= lat.p_value <= lat.p_bounds[1]
        assert (lat.p_bounds[1] - lat.p_bounds[0]) < 1e-2 * lat.p_value  # default: 2**20 cells
        mc = P.fisher_exact(nulls, obs, method="monte_carlo", n_draws=100_000, random_state=3)
        assert abs(lat.p_value - mc.p_value) < 4 * mc.standard_error
        coarse = P.fisher_exact(nulls, obs, cells=2**12)
        assert coarse.p_bounds[0] <= lat.p_value <= coarse.p_bounds[1]
        again = P.fisher_exact(nulls, obs, method="monte_carlo", n_draws=100_000, random_state=3)
        assert again.p_value == mc.p_value  # same seed, same p


def test_tiny_p_keeps_relative_precision():
    # 12 subclusters all at the best rank among 9 random sets: p = 10**-12 exactly
    q = P.null_percentiles(np.r_[9.0, np.arange(9.0)])
    r = P.fisher_exact([q] * 12, [q[0]] * 12)
    assert r.method == "lattice" and r.p_value == pytest.approx(1e-12, rel=1e-9)
    assert fisher([q[0]] * 12)[1] > 1e-7  # what the chi2 null says


def test_null_distribution_of_the_p_value():
    rng = np.random.default_rng(11)
    nulls, obs = _network(rng, 4, 4, 3)
    r = P.fisher_exact(nulls, obs, method="enumeration", with_null=True)
    d = r.null
    assert d.probs.sum() == pytest.approx(1.0) and np.all(np.diff(d.values) > 0)
    # a discrete valid p value: P(p <= v) = v at each atom
    np.testing.assert_allclose(np.cumsum(d.probs), d.values, rtol=1e-12)
    assert d.observed == pytest.approx(r.p_value)
    lat = P.fisher_exact(nulls, obs, method="lattice", with_null=True).null
    assert lat.probs.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.cumsum(lat.probs), lat.values, atol=1e-9)


def test_replicate_step_against_brute_force():
    rng = np.random.default_rng(3)
    nets = [_network(rng, 2, 3, lv) for lv in (None, 3, None)]
    tests = [P.fisher_exact(n, o, method="enumeration", with_null=True) for n, o in nets]
    # brute force: every configuration of every network, each network's own exact p value
    per_net = []
    for nulls, _ in nets:
        configs = list(itertools.product(*nulls))
        per_net.append([_brute(nulls, list(c)) for c in configs])
    obs_mean = np.mean([t.p_value for t in tests])
    means = np.array([np.mean(c) for c in itertools.product(*per_net)])
    ref = float(np.mean(means <= obs_mean + 1e-12))
    rep = P.replicate_exact(tests)
    assert rep.p_bounds[0] - 1e-12 <= ref <= rep.p_bounds[1] + 1e-12
    assert rep.p_value == pytest.approx(ref, rel=1e-6)
    assert P.replicate_exact(tests[:1]).p_value == tests[0].p_value  # one network: its own p
    with pytest.raises(ValueError, match="with_null=True"):
        P.replicate_exact([P.fisher_exact(*nets[0])])


# ----------------------------------------------------------------------------- calibration


def test_calibration_on_null_networks():
    """2,000 null networks: values exchangeable (continuous or heavily tied), 9 or 19 random
    sets, 5 to 100 subclusters. The exact test rejects at its nominal rate; Fisher-chi2 far less."""
    rng = np.random.default_rng(2024)
    n_nets = 2000
    p_fisher, p_exact = np.empty(n_nets), np.empty(n_nets)
    for i in range(n_nets):
        m, n = int(rng.integers(5, 101)), int(rng.choice([9, 19]))
        levels = int(rng.choice([2, 3, 4])) if i % 2 else None
        nulls, obs = _network(rng, m, n, levels)
        p_fisher[i] = fisher(obs)[1]
        # coarse lattice for speed: the p value is exact for the rounded statistic at any spacing
        p_exact[i] = P.fisher_exact(nulls, obs, cells=2**10).p_value
    for alpha in (0.05, 0.01):
        se = np.sqrt(alpha * (1 - alpha) / n_nets)
        rate_e, rate_f = np.mean(p_exact <= alpha), np.mean(p_fisher <= alpha)
        print(f"alpha {alpha}: exact {rate_e:.4f}, fisher-chi2 {rate_f:.4f} (MC se {se:.4f}, {n_nets} networks)")
        assert abs(rate_e - alpha) <= 3 * se
        assert rate_f < alpha - 3 * se if alpha == 0.05 else rate_f < rate_e


def test_replicate_calibration():
    """Exact Bates step over 3 null networks (heavily tied): nominal rate; Fisher-Bates far below."""
    rng = np.random.default_rng(77)
    n_sets = 600
    pe, pf = np.empty(n_sets), np.empty(n_sets)
    for i in range(n_sets):
        nets = [_network(rng, int(rng.integers(5, 16)), 9, 3) for _ in range(3)]
        tests = [P.fisher_exact(nl, o, cells=2**10, with_null=True) for nl, o in nets]
        pe[i] = P.replicate_exact(tests, cells=2**12).p_value
        pf[i] = fisher_bates([fisher(o)[1] for _, o in nets])
    se = np.sqrt(0.05 * 0.95 / n_sets)
    print(f"replicates alpha 0.05: exact {np.mean(pe <= 0.05):.4f}, fisher-bates {np.mean(pf <= 0.05):.4f} (se {se:.4f})")
    assert abs(np.mean(pe <= 0.05) - 0.05) <= 3 * se
    assert np.mean(pf <= 0.05) < 0.05 - 3 * se


# ----------------------------------------------------------------------------- power


def _weakened(model, eps, seed=0):
    """Copy of a planted MLP with cross-module weights eps x (in-module weight scale) added."""
    import copy

    import torch
    from planted import block_masks

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    lins = [layer for layer in m if isinstance(layer, torch.nn.Linear)]
    masks = block_masks([lins[0].in_features] + [layer.out_features for layer in lins], 4)
    with torch.no_grad():
        for layer, mask in zip(lins, masks):
            scale = layer.weight[mask.bool()].std()
            layer.weight.add_(eps * scale * torch.randn(layer.weight.shape, generator=g) * (1 - mask))
    return m


def _lesion_pool(model, modules, eps, data):
    """True modules' accuracy drops and 200 random sets' per module, lesioned once."""
    import modlens

    res = modlens.analyze(_weakened(model, eps), data, partition=modules, n_random=200, random_state=0)
    true, pools = [], []
    for _, g in res.subclusters.groupby(["layer", "cluster"], sort=True):
        true.append(float(g.loc[g["kind"] == "true", "acc_drop"].iloc[0]))
        pools.append(g.loc[g["kind"] == "random", "acc_drop"].to_numpy())
    return np.array(true), pools


def _seed_tables(true, pools, seeds=50):
    """Per seed: 9 random sets per module drawn from the pool; (percentiles, null percentiles)."""
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        rand = np.array([pool[rng.choice(pool.size, 9, replace=False)] for pool in pools])
        out.append((percentiles(true, rand), P.null_percentiles(np.column_stack([true, rand]))))
    return out


def test_power_on_weakly_planted_modules():
    """Lesions of a real network: the 12 true modules and a pool of 200 random sets per module are
    lesioned once; each of 50 seeds draws 9 random sets per module from the pool (the lesion
    table a run with that seed could have produced) and tests the true modules both ways. The
    cross-module weight scale starts at 0.49 (measured: Fisher-chi2 rejects 26 of 50 seeds) and is
    bisected if this machine's trained network puts the paper's test outside 30-70 %."""
    import torch

    from planted import planted_data, planted_mlp

    with torch.random.fork_rng():  # dropout draws from the global generator: fix it
        torch.manual_seed(0)
        model, modules = planted_mlp(seed=0)
    data = planted_data(200, seed=1)
    lo, hi, eps = 0.3, 0.7, 0.49
    for _ in range(6):
        tables = _seed_tables(*_lesion_pool(model, modules, eps, data))
        rate_f = np.mean([fisher(obs)[1] <= 0.05 for obs, _ in tables])
        if 0.3 <= rate_f <= 0.7:
            break
        lo, hi = (eps, hi) if rate_f > 0.7 else (lo, eps)  # more cross weights, weaker modules
        eps = (lo + hi) / 2
    rej_f = np.array([fisher(obs)[1] <= 0.05 for obs, _ in tables])
    rej_e = np.array([P.fisher_exact(list(nulls), obs, cells=2**14).p_value <= 0.05 for obs, nulls in tables])
    print(f"weakly planted (eps {eps:.3f}), 50 seeds: fisher-chi2 rejects {rej_f.mean():.2f}, exact rejects "
          f"{rej_e.mean():.2f}, exact rejects where fisher does not {np.sum(rej_e & ~rej_f)}, the reverse {np.sum(rej_f & ~rej_e)}")
    assert 0.3 <= rej_f.mean() <= 0.7
    assert rej_e.mean() >= rej_f.mean() + 0.1


# ----------------------------------------------------------------------------- plumbing


def test_analyze_and_combine_with_exact(planted):
    import modlens

    model, modules, (x, y), _ = planted
    res = modlens.analyze(model, (x[:300], y[:300]), partition=modules, n_random=9, combine="exact")
    s = res.summary.set_index("metric")
    assert list(res.summary["combine"]) == ["exact", "exact"] and res.config["combine"] == "exact"
    t = res.tests[res.tests["metric"] == "acc_drop"]
    direct = P.fisher_exact(t["null_percentiles"].tolist(), t["percentile"].to_numpy()).p_value
    assert s.loc["acc_drop", "p_value"] == direct
    # modules (nearly) all at the best rank of 10: exact p ~ 10**-12, where Fisher-chi2 says ~1e-6
    assert 1e-12 * (1 - 1e-9) <= direct < 1e-9 < fisher(t["percentile"].to_numpy())[1]
    assert "combine=exact" in repr(res)
    assert len(res.tests["null_percentiles"].iloc[0]) == 10
    fish = modlens.analyze(model, (x[:300], y[:300]), partition=modules, n_random=9)
    assert list(fish.summary["combine"]) == ["fisher", "fisher"]
    pd.testing.assert_frame_equal(res.tests, fish.tests)  # only the combination differs
    both = modlens.combine([res, res], ["a", "b"])  # inherits combine="exact"
    assert list(both.summary["combine"]) == ["exact", "exact"]
    assert both.summary.set_index("metric").loc["acc_drop", "p_value"] < 1e-10
    assert list(modlens.combine([res, res], combine="fisher").summary["combine"]) == ["fisher", "fisher"]
    with pytest.raises(ValueError, match="combine must be one of"):
        modlens.analyze(model, (x, y), partition=modules, combine="stouffer")


def test_summarize_exact_all_ties_and_missing_column():
    from modlens.analysis.statistics import subcluster_tests, summarize

    rows = []
    for c in range(3):
        for d in range(6):
            rows.append(dict(network="0", partitioning="p", layer=0, layer_name="h", cluster=c, size=4,
                             kind="true" if d == 0 else "random", draw=d, acc_drop=0.0, class_range=0.0))
    tests = subcluster_tests(pd.DataFrame(rows))
    s = summarize(tests, combine="exact")
    assert list(s["p_value"]) == [1.0, 1.0] and list(s["combine"]) == ["exact", "exact"]
    with pytest.raises(ValueError, match="null_percentiles"):
        summarize(tests.drop(columns="null_percentiles"), combine="exact")


def test_cli_option():
    from modlens.cli import _analysis_kwargs, build_parser

    args = build_parser().parse_args(["analyze", "m", "--out", "o", "--combine", "exact"])
    assert _analysis_kwargs(args)["combine"] == "exact"
    assert "combine" not in _analysis_kwargs(build_parser().parse_args(["analyze", "m", "--out", "o"]))
    assert AnalysisConfig().combine == "fisher"  # what an option left out of the command line is
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "m", "--out", "o", "--combine", "stouffer"])


def test_monte_carlo_null_feeds_the_replicate_step():
    rng = np.random.default_rng(21)
    nets = [_network(rng, 20, 9, 3) for _ in range(2)]
    lat = P.replicate_exact([P.fisher_exact(n, o, cells=2**12, with_null=True) for n, o in nets])
    mc = P.replicate_exact([P.fisher_exact(n, o, method="monte_carlo", n_draws=20_000, random_state=i, with_null=True)
                            for i, (n, o) in enumerate(nets)])
    assert mc.method == "monte_carlo" and mc.standard_error > 0
    assert abs(lat.p_value - mc.p_value) < 0.02
    net_p, p = P.combine_networks(nets, random_state=4)
    assert len(net_p) == 2 and 0 < p <= 1 and P.combine_networks(nets, random_state=4) == (net_p, p)


def test_exact_summary_from_saved_tables(tmp_path):
    """The tests table read back from Parquet or CSV gives the same exact summary."""
    from modlens.analysis.statistics import subcluster_tests, summarize

    rng = np.random.default_rng(8)
    rows = [dict(network="0", partitioning="p", layer=0, layer_name="h", cluster=c, size=4,
                 kind="true" if d == 0 else "random", draw=d, acc_drop=float(rng.integers(0, 3)) + (d == 0),
                 class_range=float(rng.normal()))
            for c in range(6) for d in range(10)]
    tests = subcluster_tests(pd.DataFrame(rows))
    ref = summarize(tests, combine="exact")
    tests.to_parquet(tmp_path / "t.parquet")
    tests.to_csv(tmp_path / "t.csv", index=False)
    for back in (pd.read_parquet(tmp_path / "t.parquet"), pd.read_csv(tmp_path / "t.csv")):
        got = summarize(back, combine="exact")
        np.testing.assert_allclose(got["p_value"], ref["p_value"], rtol=1e-12)
    assert (ref["p_value"] >= 0).all() and ref.loc[0, "p_value"] < summarize(tests).loc[0, "p_value"]
