"""combine="exact" vs the paper's Fisher-chi2: level, accuracy of the lattice, time.

    python benchmarks/exact_combination.py [--networks 4000] [--seed 0] [--level-only]

1. Level: simulated null networks (each subcluster's n + 1 values drawn exchangeably, continuous
   or heavily tied; 9 or 19 random sets; 5 to 100 subclusters): rejection rates at 0.05 and 0.01
   of Fisher-chi2 and of the exact test, with their Monte Carlo standard errors.
2. Accuracy: the lattice p value (default 2**20 cells) against full enumeration on small
   networks, the width of its rigorous bracket for the unrounded statistic, and its distance to a
   lattice four times finer.
3. Time per network of the default lattice (ratio to Fisher-chi2 in the same run).
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modlens.core import permutation as P
from modlens.core.stats import fisher, percentiles


def network(rng, m, n, levels=None):
    v = rng.integers(0, levels, size=(m, n + 1)).astype(float) if levels else rng.normal(size=(m, n + 1))
    return list(P.null_percentiles(v)), percentiles(v[:, 0], v[:, 1:])


def level(rng, count):
    rows = {}
    for i in range(count):
        m, n = int(rng.integers(5, 101)), int(rng.choice([9, 19]))
        heavy = bool(i % 2)
        nulls, obs = network(rng, m, n, int(rng.choice([2, 3, 4])) if heavy else None)
        rows.setdefault((n, heavy), []).append((fisher(obs)[1], P.fisher_exact(nulls, obs, cells=2**10).p_value))
    print(f"1. level over {count} null networks (exact: lattice of 2**10 cells, exact for its rounded statistic)")
    allp = np.array([r for v in rows.values() for r in v])
    for name, sel in [("all", allp)] + [(f"n={n:2d} {'heavy ties' if h else 'continuous'}", np.array(v))
                                        for (n, h), v in sorted(rows.items())]:
        cells = []
        for a in (0.05, 0.01):
            se = np.sqrt(a * (1 - a) / len(sel))
            cells.append(f"a={a}: fisher {np.mean(sel[:, 0] <= a):.4f} exact {np.mean(sel[:, 1] <= a):.4f} (se {se:.4f})")
        print(f"   {name:24s} N={len(sel):5d}  " + "  ".join(cells))


def accuracy(rng):
    print("2. accuracy of the default lattice (2**20 cells)")
    errs = []
    for _ in range(200):
        m, n = int(rng.integers(2, 5)), int(rng.choice([4, 9]))
        nulls, obs = network(rng, m, n, int(rng.choice([2, 3])) if rng.random() < 0.5 else None)
        ref = P.fisher_exact(nulls, obs, method="enumeration").p_value
        lat = P.fisher_exact(nulls, obs, method="lattice").p_value
        errs.append(abs(lat - ref) / ref)
    errs = np.array(errs)
    print(f"   vs enumeration, 200 networks of 2-4 subclusters: relative error median {np.median(errs):.1e}, "
          f"max {errs.max():.1e}, exact match in {np.mean(errs < 1e-12):.0%}")
    for m in (12, 48, 100):
        widths, diffs = [], []
        for _ in range(10):
            nulls, obs = network(rng, m, 19, 3 if rng.random() < 0.5 else None)
            r = P.fisher_exact(nulls, obs)
            fine = P.fisher_exact(nulls, obs, cells=2**22)
            widths.append((r.p_bounds[1] - r.p_bounds[0]) / r.p_value)
            diffs.append(abs(r.p_value - fine.p_value) / fine.p_value)
        print(f"   m={m:3d}, n=19: bracket width / p median {np.median(widths):.1e} (max {max(widths):.1e}); "
              f"|p - p(4x finer)| / p median {np.median(diffs):.1e} (max {max(diffs):.1e})")


def timing(rng):
    print("3. time per network (default lattice vs Fisher-chi2, same run)")
    for m in (12, 48, 100):
        nulls, obs = network(rng, m, 19, 3)
        t0 = time.perf_counter()
        for _ in range(3):
            P.fisher_exact(nulls, obs)
        t1 = time.perf_counter()
        for _ in range(300):
            fisher(obs)
        t2 = time.perf_counter()
        print(f"   m={m:3d}: exact {(t1 - t0) / 3 * 1e3:.0f} ms, fisher {(t2 - t1) / 300 * 1e6:.0f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level-only", action="store_true", help="skip the accuracy and timing parts")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    if a.networks > 0:
        level(rng, a.networks)
    if not a.level_only:
        accuracy(rng)
        timing(rng)


if __name__ == "__main__":
    main()
