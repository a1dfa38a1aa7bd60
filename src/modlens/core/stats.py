"""Statistics of the analysis pipeline (paper section 3.2, figure 4, appendix A.7).

From per-subcluster measures to a verdict:

1. :func:`percentiles` - centred percentile of each true subcluster among its random
   subclusters of the same layer and size (low = more modular; footnote 4).
2. :func:`fisher` - Fisher's method over one network's percentiles (notes row 12).
3. :func:`fisher_bates` / :func:`bates_cdf` - the mean of the replicate networks' Fisher p
   values referred to the Bates(n) distribution (footnotes 6-7, notes row 13).
4. :func:`benjamini_hochberg` - false discovery rate control over the experiments (A.7).
5. :func:`effect_values` / :func:`effect_measure` - mean of 2x/(x+mu) with its standard
   error (section 3.2, footnote 9, notes row 14).

Pure NumPy/SciPy; no torch, pandas or matplotlib.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _sps

__all__ = [
    "TIE_RULES",
    "percentiles",
    "fisher",
    "bates_cdf",
    "fisher_bates",
    "benjamini_hochberg",
    "effect_values",
    "effect_measure",
]

#: Largest n for which :func:`bates_cdf` sums the Irwin-Hall series exactly (< 0.2 s).
BATES_EXACT_MAX_N = 1000


def _as_array(name: str, values, ndim: int | None = None, *, allow_nan: bool = False) -> np.ndarray:
    """Float array copy of ``values``; ValueError naming the first NaN position or a bad ndim."""
    arr = np.array(values, dtype=float)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not allow_nan:
        bad = np.argwhere(np.isnan(arr))
        if bad.size:
            pos = tuple(int(i) for i in bad[0])
            raise ValueError(f"{name} contains NaN at position {pos[0] if len(pos) == 1 else pos}")
    return arr


#: Tie rules of :func:`percentiles`: the paper's mid-rank, or the original code's (notes row 11).
TIE_RULES = ("mid", "original")


def percentiles(true_values, random_values, *, higher_is_modular: bool = True, ties: str = "mid") -> np.ndarray:
    """Centred percentile of each true subcluster among its random subclusters.

    ``true_values`` has shape (m,), ``random_values`` shape (m, n): row i holds the n random
    subclusters drawn for true subcluster i (same layer and size, section 3.2). A LOW result
    means MORE modular: when high measures indicate modularity (``higher_is_modular=True``,
    e.g. accuracy drop) the percentile of the negated measure is taken (footnote 4).

    The paper's percentile is rank/(n+1) centred by subtracting 1/(2(n+1)), where
    rank = 1 + (number of randoms more modular than the true subcluster). Results lie on the
    grid (j + 0.5)/(n+1), j = 0..n, i.e. 0.025 .. 0.975 for n = 19, and are uniform on it
    under the null for continuous measures.

    ``ties`` says how a random subcluster whose measure equals the true one counts:

    * ``"mid"`` (default, modlens' choice): a tie counts one half (mid-rank), so the
      percentile is (less + ties/2 + 1/2)/(n+1). Under the null the mean stays 0.5 even for
      discrete measures, and when nothing differs (all ties, e.g. a lesion that changes
      nothing) every percentile is exactly 0.5 - conservative for Fisher.
    * ``"original"``: reproduces the original code (notes row 11): r = number of randoms
      STRICTLY more modular, percentile = (r+1)/(n+1) - 1/(2(n+1)). Ties count in favour of
      modularity, which is anti-conservative: all ties give 1/(2(n+1)), the most modular value.

    Raises ValueError on NaN (naming its position), on mismatched shapes, n < 1, or an
    unknown ``ties``.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be 'mid' or 'original', got {ties!r}")
    t = _as_array("true_values", true_values, 1)
    r = _as_array("random_values", random_values, 2)
    if r.shape[0] != t.shape[0]:
        raise ValueError(
            f"random_values must have shape (m, n) with m = len(true_values); got true_values shape "
            f"{t.shape} and random_values shape {r.shape}"
        )
    n = r.shape[1]
    if n < 1:
        raise ValueError(f"need at least one random subcluster per true one, got random_values shape {r.shape}")
    if higher_is_modular:  # footnote 4: percentile of the negated metric
        t, r = -t, -r
    less = np.sum(r < t[:, None], axis=1)  # randoms strictly more modular
    if ties == "mid":
        score = less + 0.5 * np.sum(r == t[:, None], axis=1)
    else:
        score = less.astype(float)
    return (score + 1.0) / (n + 1) - 1.0 / (2 * (n + 1))


def fisher(pvalues) -> tuple[float, float]:
    """Fisher's method: statistic -2 sum log p_i and its upper-tail chi2(2n) p value.

    Section 3.2: low percentiles give a large statistic and a small p value. Same numbers as
    ``scipy.stats.combine_pvalues(p, method='fisher')`` used by the original code (row 12).
    Requires a non-empty 1-D input with 0 < p <= 1.
    """
    p = _as_array("pvalues", pvalues, 1)
    if p.size == 0:
        raise ValueError("fisher needs at least one p value")
    bad = np.flatnonzero(~((p > 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"p values must lie in (0, 1]; pvalues[{bad[0]}] = {p[bad[0]]}")
    statistic = float(-2.0 * np.sum(np.log(p))) + 0.0  # + 0.0: no -0.0 when all p == 1
    return statistic, float(_sps.chi2.sf(statistic, 2 * p.size))


def _bates_edgeworth(v: float, n: int) -> float:
    """Edgeworth approximation of the Bates(n) CDF (abs. error ~1e-8 at n = 1000, O(n^-2))."""
    z = (v - 0.5) * math.sqrt(12.0 * n)
    # excess kurtosis of the mean of n uniforms is -6/(5n); no skewness.
    f = _sps.norm.cdf(z) + _sps.norm.pdf(z) * (z**3 - 3.0 * z) / (20.0 * n)
    return float(min(1.0, max(0.0, f)))


def bates_cdf(v, n: int) -> float:
    """Exact lower-tail CDF of the mean of ``n`` independent U(0, 1) variables.

    P(mean <= v) = (1/n!) sum_{k=0}^{floor(n v)} (-1)^k C(n, k) (n v - k)^n, the Irwin-Hall
    CDF at n v. This is what the original code computes (notes row 13); the paper's footnote 6
    prints the exponent n-1 by mistake. Clamped: v <= 0 gives 0, v >= 1 gives 1.

    The alternating sum cancels catastrophically in floating point, so for n <=
    ``BATES_EXACT_MAX_N`` it is evaluated in exact integer arithmetic (v = a/b exactly, as a
    float is a dyadic rational) and rounded once; for v > 1/2 the symmetry
    F(v) = 1 - F(1 - v) is used (exact, as 1 - v is exact for floats in (1/2, 1)). For larger n
    an Edgeworth (normal + kurtosis) approximation is used, accurate to ~1e-8 absolute.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    n = int(n)
    v = float(v)
    if math.isnan(v):
        raise ValueError("v is NaN")
    if v <= 0.0:
        return 0.0
    if v >= 1.0:
        return 1.0
    if v > 0.5:
        return 1.0 - bates_cdf(1.0 - v, n)
    if n == 1:
        return v
    if n > BATES_EXACT_MAX_N:
        return _bates_edgeworth(v, n)
    a, b = v.as_integer_ratio()  # v = a/b exactly
    x = n * a  # n v = x/b
    total = 0
    for k in range(x // b + 1):  # k <= floor(n v)
        term = math.comb(n, k) * (x - k * b) ** n
        total += -term if k % 2 else term
    return total / (b**n * math.factorial(n))  # int/int: correctly rounded


def fisher_bates(network_pvalues) -> float:
    """Fisher-Bates p value over replicate networks: ``bates_cdf(mean(p), len(p))``.

    Section 3.2 (footnotes 6-8): the mean of the per-network Fisher p values is referred to
    the Bates(n) distribution; small means give small p values. With one network this
    returns its p value (footnote 8). Requires a non-empty 1-D input with 0 <= p <= 1.
    """
    p = _as_array("network_pvalues", network_pvalues, 1)
    if p.size == 0:
        raise ValueError("fisher_bates needs at least one p value")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"p values must lie in [0, 1]; network_pvalues[{bad[0]}] = {p[bad[0]]}")
    return bates_cdf(float(np.mean(p)), p.size)


def benjamini_hochberg(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, float]:
    """Benjamini-Hochberg false discovery rate control (appendix A.7).

    Returns ``(q, reject, critical)``:

    * ``q`` - BH adjusted p values in input order: q_(j) = min_{i >= j} p_(i) m / i, capped
      at 1 (equal to ``scipy.stats.false_discovery_control(p, method='bh')``);
    * ``reject`` - ``q <= alpha``;
    * ``critical`` - the critical p value p_k, k = max{j : p_(j) <= j alpha / m} (0.0 if no
      such j); every p <= p_k is rejected. It is taken as the largest rejected p, so that it
      agrees with ``reject`` even where rounding at the boundary could make the two
      formulations differ. The paper's value was p_k = 0.025.

    NaN p values are ignored: their q is NaN, they are never rejected, and m counts only the
    finite ones. Other values must lie in [0, 1].
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    p = _as_array("pvalues", pvalues, 1, allow_nan=True)
    ok = ~np.isnan(p)
    bad = np.flatnonzero(ok & ~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"p values must lie in [0, 1]; pvalues[{bad[0]}] = {p[bad[0]]}")
    q = np.full(p.shape, np.nan)
    reject = np.zeros(p.shape, dtype=bool)
    finite = p[ok]
    m = finite.size
    if m == 0:
        return q, reject, 0.0
    order = np.argsort(finite, kind="stable")
    adj = finite[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    q_ok = np.empty(m)
    q_ok[order] = np.minimum(adj, 1.0)
    q[ok] = q_ok
    reject[ok] = q_ok <= alpha
    critical = float(np.max(p[reject])) if reject.any() else 0.0
    return q, reject, critical


def effect_values(true_values, random_means, *, rule: str = "paper") -> np.ndarray:
    """Per-subcluster effect 2x/(x + mu) (section 3.2, figure 4 step 5a).

    x is the true subcluster's measure and mu the mean of its random subclusters' measures.
    Values above 1 mean the true subcluster measures higher than random ones.

    * ``rule="paper"``: ``2 x+ / (x+ + mu+)`` with ``x+ = max(x, 0)``, ``mu+ = max(mu, 0)``
      and ``0/0 = 1``. Where x, mu >= 0 this is the paper's 2x/(x+mu), already in [0, 2].
      Footnote 9 sets negative values of the ratio to 0; modlens applies that zeroing to
      the two inputs instead (a negative change, e.g. an accuracy gain, is no drop), which
      keeps the value monotone non-decreasing in x, equal to 1 at x = mu, and in [0, 2]
      everywhere. Corner cases: x < 0 < mu -> 0 (a gain never counts as importance);
      x > 0 >= mu -> 2; x <= 0 and mu <= 0 (nothing dropped on either side, including
      x == mu == 0 and x + mu < 0) -> 1, neutral; x == 0 < mu -> 0. The raw formula with
      clamping would instead give 2 for x < 0, x + mu < 0 (an accuracy gain scored as the
      strongest importance) and 0 for x > 0 > x + mu.
    * ``rule="original_lesion"``: reproduces the original lesion code (notes row 14): the
      value is 0 unless both x > 0 and mu > 0 (both are drops), else 2x/(x + mu), in (0, 2).

    Raises ValueError on NaN, mismatched shapes or an unknown rule.
    """
    if rule not in ("paper", "original_lesion"):
        raise ValueError(f"rule must be 'paper' or 'original_lesion', got {rule!r}")
    x = _as_array("true_values", true_values, 1)
    mu = _as_array("random_means", random_means, 1)
    if x.shape != mu.shape:
        raise ValueError(f"true_values shape {x.shape} and random_means shape {mu.shape} differ")
    if rule == "original_lesion":
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = 2.0 * x / (x + mu)
        return np.where((x > 0) & (mu > 0), raw, 0.0)
    xp, mp = np.maximum(x, 0.0), np.maximum(mu, 0.0)
    denom = xp + mp
    out = np.ones_like(xp)  # both zero after clipping: neutral
    np.divide(2.0 * xp, denom, out=out, where=denom > 0)
    return np.clip(out, 0.0, 2.0)  # exact already; guards rounding of 2x/(x+tiny)


def effect_measure(values) -> tuple[float, float]:
    """(mean, standard error) of per-subcluster effect values (section 3.2, table 1).

    SE = std(ddof=1)/sqrt(n), the same as ``scipy.stats.sem`` (the original code's choice,
    notes row 14; pool the replicates' values before calling to reproduce it). n == 1 gives
    an SE of NaN; an empty input gives (nan, nan). NaN values raise ValueError.
    """
    v = _as_array("values", values).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    mean = float(np.mean(v))
    if v.size == 1:
        return mean, float("nan")
    return mean, float(np.std(v, ddof=1) / math.sqrt(v.size))


def pairwise_effect_values(true_values, random_values) -> np.ndarray:
    """The original code's visualization effect values (notes row 14): the (m, n) matrix of
    2 x_i / (x_i + r_ij) for true subcluster i and each of its random draws j.

    ``true_values`` has shape (m,), ``random_values`` shape (m, n) (row i: the draws of true
    subcluster i). The original effect measure is the mean of all m*n values, pooled over
    replicates, with ``scipy.stats.sem`` of the pooled values: pass ``.ravel()`` of the
    result to :func:`effect_measure`. Unlike :func:`effect_values` nothing is clamped (the
    visualization measures are non-negative); x + r == 0 with x == 0 gives 1.0 (neutral) and
    with x != 0 gives 2.0 if x > 0 else 0.0, as :func:`effect_values` does.
    """
    x = _as_array("true_values", true_values, 1)
    r = _as_array("random_values", random_values, 2)
    if r.shape[0] != x.shape[0]:
        raise ValueError(
            f"random_values must have shape (m, n) with m = len(true_values); got true_values shape "
            f"{x.shape} and random_values shape {r.shape}"
        )
    xx = np.broadcast_to(x[:, None], r.shape)
    denom = xx + r
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 2.0 * xx / denom
    zero = denom == 0
    out[zero] = np.where(xx[zero] > 0, 2.0, np.where(xx[zero] == 0, 1.0, 0.0))
    return out


__all__ += ["pairwise_effect_values"]
