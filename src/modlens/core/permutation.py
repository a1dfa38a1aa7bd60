"""Exact conditional permutation null for combining subcluster percentiles (modlens extension).

The paper combines a network's subcluster percentiles with Fisher's method against a chi2
null, which is conservative for coarse (discrete, tied) percentiles (its footnote 5). Here the
same Fisher statistic T = -2 sum ln q_i is referred to its exact conditional null instead:

* Under H0 a true subcluster is exchangeable with its n random sets, so given the n + 1 values
  it is equally likely to have had the percentile of any of them (computed by the same rule,
  ties included, as the observed one). Subclusters are independent. Each subcluster thus
  contributes a known discrete distribution (its "null percentiles", n + 1 equally likely).
* :func:`fisher_exact` computes P(T >= t_obs) under that null. Small networks (at most 2**16
  configurations) are enumerated exactly. Otherwise each contribution -2 ln q is written as
  u = c_i - x (u >= 0, small u = modular) and put on a lattice of spacing h (default: span /
  2**20). Percentiles lie on the grid a / (2(n + 1)) with integer a, and u = 2 ln a - const, so
  the lattice value of 2 ln a is the sum over a's prime factors p of rint(2 ln p / h): equal
  products, i.e. exact ties of T, stay exact ties (:func:`_prime_lattice`). The sum of lattice
  indices is a sum of independent integer variables whose distribution is computed by
  convolution (direct and all-positive when cheap, FFT otherwise; an FFT tail below 1e-6 is
  recomputed directly). The returned p value is P(K <= K_obs): the exact null p value of the
  lattice-rounded Fisher statistic, so the test holds its level exactly for every h;
  ``p_bounds`` brackets the p value of the unrounded statistic rigorously (:func:`_bracket`).
* :func:`replicate_exact` is the exact Bates step: the mean of the networks' p values referred
  to the exact null distribution of that mean, the convolution of each network's discrete null
  distribution of its p value (again on a lattice, with the same bracket). No randomization
  and no mid-p: each network's p value is the ordinary (conservative) discrete one, and the
  discreteness is carried into the replicate step instead of being assumed away.
* ``method="monte_carlo"`` (or ``"auto"`` for very large inputs): seeded draws from the same
  null, p = (1 + #{T* >= t_obs}) / (1 + R), which is itself a valid p value; its standard error
  sqrt(p (1 - p) / R) is returned.

Pure NumPy/SciPy; no torch, pandas or matplotlib.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import fft as _fft

from modlens.core.seeds import as_generator

__all__ = ["NullDistribution", "CombinedTest", "null_percentiles", "fisher_exact", "replicate_exact", "combine_networks",
           "METHODS"]

METHODS = ("auto", "enumeration", "lattice", "monte_carlo")
#: ``method="auto"`` enumerates every configuration when there are at most this many.
ENUMERATION_MAX = 2**16
#: Lattice cells used by default (the resolution is the statistic's span divided by this).
DEFAULT_CELLS = 2**20
#: Direct (all-positive) convolution is used when atoms x cells is at most this.
DIRECT_BUDGET = 4_000_000
#: Below this, a p value from the FFT path is recomputed by direct convolution.
FFT_TAIL = 1e-6
#: ``method="auto"`` switches to Monte Carlo above this many atoms in all (e.g. n = 10^4 draws).
AUTO_MC_ATOMS = 200_000
_REL_TOL = 1e-9  # float comparisons of statistics in the Monte Carlo path


@dataclass(frozen=True)
class NullDistribution:
    """Discrete null distribution of a p value: sorted atoms and their probabilities."""

    values: np.ndarray
    probs: np.ndarray
    observed: float  # the atom taken by the observed data


@dataclass(frozen=True)
class CombinedTest:
    """Result of :func:`fisher_exact` or :func:`replicate_exact`.

    p_value:   exact null p value of the (lattice-rounded) statistic, or the Monte Carlo one.
    statistic: Fisher statistic -2 sum ln q (network) or the mean p value (replicates).
    method:    "enumeration" (every configuration), "lattice", "monte_carlo" or "trivial"
               (no subcluster can vary: p = 1).
    p_bounds:  rigorous bounds on the p value of the unrounded statistic (lattice; (p, p) for
               enumeration); for Monte Carlo p -/+ 4 standard errors, clipped to [0, 1].
    resolution: lattice spacing h (0 for Monte Carlo and trivial).
    standard_error: Monte Carlo standard error (0 otherwise).
    null:      the discrete null distribution of ``p_value`` (for the replicate step), when asked.
    """

    p_value: float
    statistic: float
    method: str
    p_bounds: tuple[float, float]
    resolution: float = 0.0
    standard_error: float = 0.0
    null: NullDistribution | None = field(default=None, repr=False)


def null_percentiles(values, *, higher_is_modular: bool = True, ties: str = "mid") -> np.ndarray:
    """The n + 1 percentiles one subcluster could have had: entry j is the percentile of
    ``values[j]`` among the other n values, by :func:`modlens.core.stats.percentiles` with the
    same direction and tie rule as the observed percentile (which is entry 0 when ``values[0]``
    is the true subcluster's value). Sorted ascending. A 2-D ``values`` is one subcluster per
    row (true value first), giving one row of null percentiles each."""
    from modlens.core.stats import percentiles

    v = np.asarray(values, dtype=float)
    rows = np.atleast_2d(v)
    if v.ndim > 2 or rows.shape[1] < 2:
        raise ValueError(f"permutation.null_percentiles: need the true value and at least one random one per row, "
                         f"got shape {v.shape}")
    out = np.empty(rows.shape)
    for j in range(rows.shape[1]):  # value j as the true one, the others as its random sets
        out[:, j] = percentiles(rows[:, j], np.delete(rows, j, axis=1), higher_is_modular=higher_is_modular, ties=ties)
    out.sort(axis=1)
    return out if v.ndim == 2 else out[0]


def _atoms(nulls, observed):
    """Per subcluster: contributions x = -2 ln q of its distinct null percentiles, their
    probabilities, the index of the observed one, and q x 2(n + 1) (an integer for grid
    percentiles, see :func:`_numerators`). Validates every input."""
    obs = np.asarray(observed, dtype=float).ravel()
    if len(nulls) != obs.size:
        raise ValueError(f"permutation: {len(nulls)} null percentile sets for {obs.size} observed percentiles")
    if obs.size == 0:
        raise ValueError("permutation: need at least one subcluster")
    out = []
    for i, (q, o) in enumerate(zip(nulls, obs.tolist())):
        if q is None:
            raise ValueError(f"permutation: subcluster {i} has no null percentiles (a NaN measure?); "
                             "drop it or use combine='fisher'")
        if isinstance(q, str):  # a tests table read back from CSV: "[0.025, 0.075, ...]"
            q = json.loads(q)
        q = sorted(float(v) for v in np.ravel(q))  # short rows: plain Python is faster than NumPy here
        if not q or not (q[0] > 0 and q[-1] <= 1):  # NaN fails both comparisons
            raise ValueError(f"permutation: null percentiles of subcluster {i} must be non-empty and lie in (0, 1], got {q}")
        vals, counts = [q[0]], [1]
        for v in q[1:]:
            if v == vals[-1]:
                counts[-1] += 1
            else:
                vals.append(v)
                counts.append(1)
        j = min(range(len(vals)), key=lambda k: abs(vals[k] - o))
        if not abs(vals[j] - o) <= 1e-12:
            raise ValueError(f"permutation: observed percentile {o} of subcluster {i} is not one of its null percentiles "
                             f"{vals}; compute both with the same rule (null_percentiles)")
        out.append((-2.0 * np.log(vals), np.array(counts) / len(q), j, np.array(vals) * (2 * len(q))))
    return out


def _convolve(a, b):
    """Linear convolution of two pmfs: direct when small, else real FFT (absolute error
    ~1e-16 x length; negative round-off is clipped to 0)."""
    if min(a.size, b.size) <= 64 or a.size * b.size <= 1_000_000:
        return np.convolve(a, b)
    n = a.size + b.size - 1
    size = _fft.next_fast_len(n, real=True)
    out = _fft.irfft(_fft.rfft(a, size) * _fft.rfft(b, size), size)[:n]
    return np.maximum(out, 0.0, out=out)


def _power(pmf, n):
    result = None
    while n:
        if n & 1:
            result = pmf if result is None else _convolve(result, pmf)
        n >>= 1
        if n:
            pmf = _convolve(pmf, pmf)
    return result


def _full_pmf(kernels):
    """pmf of the sum of independent lattice variables; ``kernels`` are (offsets, probs).
    Identical kernels are raised to their power by squaring, the rest combined pairwise."""
    groups: dict = {}
    for k, w in kernels:
        key = (k.tobytes(), w.tobytes())
        groups.setdefault(key, [k, w, 0])[2] += 1
    parts = []
    for k, w, c in groups.values():
        dense = np.zeros(int(k.max()) + 1)
        np.add.at(dense, k, w)
        parts.append(_power(dense, c))
    while len(parts) > 1:
        parts.sort(key=len)
        parts = [_convolve(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)] + \
                ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _direct_cdf(kernels, limit):
    """P(K <= j) for j = 0..limit by direct convolution truncated at ``limit`` (all terms are
    non-negative, so small tail probabilities keep their relative precision)."""
    cur = np.zeros(limit + 1)
    cur[0] = 1.0
    for k, w in kernels:
        keep = k <= limit
        k, w = k[keep], w[keep]
        if k.size and int(k.max()) < 8 * k.size:  # short kernel: one dense convolution
            dense = np.zeros(int(k.max()) + 1)
            np.add.at(dense, k, w)
            cur = np.convolve(cur, dense)[: limit + 1]
            continue
        new = np.zeros(limit + 1)
        for kk, ww in zip(k.tolist(), w.tolist()):  # sparse kernel: one shifted add per atom
            new[kk:] += ww * cur[: limit + 1 - kk]
        cur = new
    return np.cumsum(cur)


def _bracket(cdf_at, k_obs, d_plus, d_minus, h):
    """p on the lattice and rigorous bounds for the unrounded statistic.

    Write u = h k + e for every atom (e: rounding residual) and let J pick each subcluster's
    atom, o the observed one. Then U - U_obs = h (K - K_obs) + sum_i (e_iJ - e_io), and
    -D_plus <= sum_i (e_iJ - e_io) <= D_minus with D_plus = sum_i (e_io - min e_i), D_minus =
    sum_i (max e_i - e_io). So U <= U_obs implies K <= K_obs + D_plus / h, and
    K < K_obs - D_minus / h implies U < U_obs:
    P(K <= K_obs - floor(D_minus/h) - 2) <= P(U <= U_obs) <= P(K <= K_obs + floor(D_plus/h) + 1)
    (one cell more each side covers the floating-point error of the residuals)."""
    lo = k_obs - int(math.floor(d_minus / h)) - 2
    hi = k_obs + int(math.floor(d_plus / h)) + 1
    return cdf_at(k_obs), (cdf_at(lo), cdf_at(hi))


def _numerators(varying):
    """Integer numerators a = q x 2(n + 1) of grid percentiles (both tie rules put percentiles
    on the grid a / (2(n + 1))), or None when some percentile is off that grid."""
    scaled = np.concatenate([v[3] for v in varying])
    a = np.rint(scaled)
    if np.any(np.abs(scaled - a) > 1e-9 * scaled) or np.any(a < 1):
        return None
    return np.split(a.astype(np.int64), np.cumsum([v[3].size for v in varying])[:-1])


def _prime_lattice(numerators, h):
    """Lattice index of 2 ln a for every numerator a, additive over prime factors:
    L(a) = sum over primes p^e || a of e x rint(2 ln p / h). Equal products of numerators thus
    get equal lattice sums, so exact ties of Fisher's statistic stay exact ties on the lattice."""
    top = int(max(int(a.max()) for a in numerators))
    spf = np.arange(top + 1)  # smallest prime factor
    for p in range(2, math.isqrt(top) + 1):
        if spf[p] == p:
            block = spf[p * p::p]
            block[block == np.arange(p * p, top + 1, p)] = p
    lat = np.zeros(top + 1, dtype=np.int64)
    for a in range(2, top + 1):
        p = int(spf[a])
        lat[a] = lat[a // p] + int(np.rint(2.0 * math.log(p) / h))
    return lat


def _lattice_test(kernels_u, obs_u, stat, *, resolution, with_null, observed_value, default_cells=DEFAULT_CELLS,
                  numerators=None):
    """Shared lattice machinery: P(sum U <= sum U_obs) with U_i >= 0 given as atoms.

    With ``numerators`` (U = 2 ln a - 2 ln a_min for integers a) the lattice is additive over
    prime factors (:func:`_prime_lattice`); otherwise each atom is rounded to the nearest cell."""
    span = float(sum(u.max() for u, _ in kernels_u))
    if span == 0.0:
        return None
    h = float(resolution) if resolution is not None else span / default_cells
    if not h > 0:
        raise ValueError(f"permutation: resolution must be positive, got {resolution!r}")
    lat = _prime_lattice(numerators, h) if numerators is not None else None
    kernels, k_obs, d_plus, d_minus = [], 0, 0.0, 0.0
    for i, ((u, w), uo) in enumerate(zip(kernels_u, obs_u)):
        if lat is None:
            k = np.rint(u / h).astype(np.int64)
        else:
            k = lat[numerators[i]]
            k = k - int(k.min())
        jo = int(np.argmin(np.abs(u - uo)))
        e = u - h * k  # rounding residuals; only their differences within a subcluster matter
        d_plus += float(e[jo] - e.min())
        d_minus += float(e.max() - e[jo])
        k_obs += int(k[jo])
        kernels.append((k, w))
    k_max = int(sum(int(k.max()) for k, _ in kernels))
    n_atoms = sum(k.size for k, _ in kernels)
    limit = min(k_obs + int(math.floor(d_plus / h)) + 2, k_max)
    full = None
    if with_null or n_atoms * (limit + 1) > DIRECT_BUDGET:
        full = _full_pmf(kernels)
        cdf = np.minimum(np.cumsum(full), 1.0)
    else:
        cdf = _direct_cdf(kernels, limit)

    def cdf_at(j):
        return 0.0 if j < 0 else float(cdf[min(j, len(cdf) - 1)]) if j < len(cdf) else 1.0

    p, bounds = _bracket(cdf_at, k_obs, d_plus, d_minus, h)
    if full is not None and bounds[1] < FFT_TAIL:  # FFT noise is absolute: redo the tail directly
        cdf_t = _direct_cdf(kernels, limit)
        p, bounds = _bracket(lambda j: 0.0 if j < 0 else float(cdf_t[min(j, limit)]), k_obs, d_plus, d_minus, h)
    null = None
    if with_null:
        support = np.flatnonzero(full > 0)
        vals = cdf[support]
        observed = cdf_at(k_obs) if observed_value is None else observed_value
        null = NullDistribution(np.minimum(vals, 1.0), full[support] / full.sum(), float(min(observed, 1.0)))
    return CombinedTest(float(min(p, 1.0)), stat, "lattice", (float(min(bounds[0], 1.0)), float(min(bounds[1], 1.0))),
                        resolution=h, null=null)


def _trivial(stat, with_null):
    null = NullDistribution(np.array([1.0]), np.array([1.0]), 1.0) if with_null else None
    return CombinedTest(1.0, stat, "trivial", (1.0, 1.0), null=null)


def fisher_exact(nulls: Sequence, observed, *, method: str = "auto", resolution: float | None = None,
                 n_draws: int = 100_000, random_state=0, with_null: bool = False,
                 cells: int = DEFAULT_CELLS) -> CombinedTest:
    """Exact conditional p value of Fisher's statistic over one network's subclusters.

    ``nulls[i]`` holds subcluster i's n_i + 1 null percentiles (:func:`null_percentiles`),
    ``observed[i]`` its observed percentile (one of them). ``method``:

    * "enumeration": every configuration; exact.
    * "lattice": exact for the statistic on a lattice of spacing ``resolution`` (default
      span / ``cells``); rigorous bounds for the unrounded statistic in ``p_bounds``.
    * "monte_carlo": ``n_draws`` draws seeded by ``random_state``.
    * "auto": enumeration up to ``ENUMERATION_MAX`` configurations, else the lattice, or Monte
      Carlo beyond ``AUTO_MC_ATOMS`` atoms.

    ``with_null`` also returns the discrete null distribution of the p value, which
    :func:`replicate_exact` needs.
    """
    if method not in METHODS:
        raise ValueError(f"permutation: method must be one of {METHODS}, got {method!r}")
    atoms = _atoms(nulls, observed)
    stat = float(sum(x[j] for x, _, j, _ in atoms)) + 0.0
    varying = [a for a in atoms if a[0].size > 1]  # a single atom is a constant: drop it
    if not varying:
        return _trivial(stat, with_null)
    n_atoms = sum(x.size for x, *_ in varying)
    if method == "monte_carlo" or (method == "auto" and n_atoms > AUTO_MC_ATOMS):
        return _monte_carlo(varying, stat, n_draws=n_draws, random_state=random_state, with_null=with_null)
    if method == "enumeration" and math.prod(x.size for x, *_ in varying) > 2**22:
        raise ValueError(f"permutation: {math.prod(x.size for x, *_ in varying):.3g} configurations are too many to "
                         f"enumerate (at most {2**22}); use method='lattice' or 'auto'")
    if method == "enumeration" or (method == "auto" and _enumerable(varying, nulls, atoms)):
        return _enumerate(varying, stat, with_null=with_null)
    kernels = [(x.max() - x, w) for x, w, *_ in varying]
    obs_u = [x.max() - x[j] for x, _, j, _ in varying]
    return _lattice_test(kernels, obs_u, stat, resolution=resolution, with_null=with_null, observed_value=None,
                         default_cells=cells, numerators=_numerators(varying))


def _enumerable(varying, nulls, atoms) -> bool:
    """Few enough configurations, and distinct Fisher statistics far enough apart for float
    sums: percentiles on the grid a / (2 (n + 1)) make exp(-T/2) a ratio of integers below
    prod 2 (n_i + 1), so two distinct statistics differ by at least 1 / prod 2 (n_i + 1)
    (kept above 1e-10, far above the rounding of a float sum)."""
    size = math.prod(x.size for x, *_ in varying)
    log_den = sum(math.log(2.0 * len(np.ravel(q))) for q, a in zip(nulls, atoms) if a[0].size > 1)
    return size <= ENUMERATION_MAX and log_den <= math.log(1e10)


def _enumerate(atoms, stat, *, with_null):
    """Every configuration of the subclusters' null percentiles, exactly (error: float sums)."""
    total, prob = np.zeros(1), np.ones(1)
    for x, w, *_ in atoms:
        total = (total[:, None] + x[None, :]).ravel()
        prob = (prob[:, None] * w[None, :]).ravel()
    obs = float(sum(x[j] for x, _, j, _ in atoms))  # constant subclusters left out, as in total
    tol = 1e-12 * max(1.0, abs(obs))  # T <= 2 ln(1e10) here: tol < 5e-11, half the smallest gap
    p = float(np.sum(prob[total >= obs - tol]))
    null = None
    if with_null:  # p value of every configuration, merged over equal statistics
        order = np.argsort(-total, kind="stable")
        t, pr = total[order], prob[order]
        new = np.concatenate([[True], np.diff(t) < -tol])
        grp = np.cumsum(new) - 1
        mass = np.bincount(grp, weights=pr)
        vals = np.minimum(np.cumsum(mass), 1.0)
        null = NullDistribution(vals, mass, min(p, 1.0))  # most extreme statistic first: ascending p
    return CombinedTest(min(p, 1.0), stat, "enumeration", (min(p, 1.0), min(p, 1.0)), null=null)


def _monte_carlo(atoms, stat, *, n_draws, random_state, with_null):
    if n_draws < 1:
        raise ValueError(f"permutation: n_draws must be positive, got {n_draws}")
    rng = as_generator(random_state)
    total = np.zeros(n_draws)
    obs = 0.0
    for x, w, j, _ in atoms:
        total += x[rng.choice(x.size, size=n_draws, p=w)]
        obs += x[j]
    tol = _REL_TOL * max(1.0, abs(obs))
    b = int(np.sum(total >= obs - tol))
    p = (1.0 + b) / (1.0 + n_draws)
    se = math.sqrt(p * (1.0 - p) / n_draws)
    null = None
    if with_null:  # each draw's own Monte Carlo p value, equally likely
        srt = np.sort(total)
        ge = n_draws - np.searchsorted(srt, total - _REL_TOL * np.maximum(1.0, np.abs(total)), side="left")
        vals, counts = np.unique((1.0 + ge) / (1.0 + n_draws), return_counts=True)
        null = NullDistribution(vals, counts / n_draws, p)
    return CombinedTest(p, stat, "monte_carlo", (max(0.0, p - 4 * se), min(1.0, p + 4 * se)),
                        standard_error=se, null=null)


def replicate_exact(networks: Sequence[CombinedTest], *, resolution: float | None = None,
                    cells: int = DEFAULT_CELLS) -> CombinedTest:
    """Exact Bates step: P(mean of the networks' p values <= observed mean) under the null.

    Each network's p value has the discrete null distribution in ``network.null`` (from
    :func:`fisher_exact` with ``with_null=True``). The mean is referred to the convolution of
    these distributions on a lattice of spacing ``resolution`` (default 1 / ``cells``) in p
    units, with the same rigorous bracket as :func:`fisher_exact`. One network gives its own
    p value (exactly P(P <= p_obs) = p_obs)."""
    if not networks:
        raise ValueError("permutation: replicate_exact needs at least one network")
    missing = [i for i, n in enumerate(networks) if n.null is None]
    if missing:
        raise ValueError(f"permutation: networks {missing} carry no null distribution; call fisher_exact(..., with_null=True)")
    stat = float(np.mean([n.null.observed for n in networks]))
    if len(networks) == 1:
        n = networks[0]
        return CombinedTest(n.p_value, stat, n.method, n.p_bounds, n.resolution, n.standard_error, n.null)
    kernels = [(n.null.values, n.null.probs) for n in networks]
    obs = [n.null.observed for n in networks]
    h = float(resolution) if resolution is not None else 1.0 / cells
    res = _lattice_test(kernels, obs, stat, resolution=h, with_null=False, observed_value=None)
    if res is None:
        return _trivial(stat, False)
    methods = {n.method for n in networks}
    se = math.sqrt(sum(n.standard_error**2 for n in networks))
    method = "monte_carlo" if "monte_carlo" in methods else "lattice"
    return CombinedTest(res.p_value, stat, method, res.p_bounds, res.resolution, se)


def combine_networks(networks: Sequence[tuple[Sequence, Sequence]], *, method: str = "auto",
                     random_state=0) -> tuple[list[float], float]:
    """Per-network exact p values and their exact replicate combination.

    ``networks`` holds one ``(nulls, observed)`` pair per replicate network (the arguments of
    :func:`fisher_exact`). Returns ``(network_p_values, p)``; with one network p is its p value.
    Monte Carlo draws (if any) use one child seed per network from ``random_state``."""
    if isinstance(random_state, np.random.Generator):
        seeds = [random_state] * len(networks)
    else:
        root = random_state if isinstance(random_state, np.random.SeedSequence) else np.random.SeedSequence(random_state)
        seeds = root.spawn(len(networks))
    several = len(networks) > 1
    tests = [fisher_exact(nulls, obs, method=method, random_state=s, with_null=several)
             for (nulls, obs), s in zip(networks, seeds)]
    if not tests:
        raise ValueError("permutation: combine_networks needs at least one network")
    return [t.p_value for t in tests], replicate_exact(tests).p_value if several else tests[0].p_value
