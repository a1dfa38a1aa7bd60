"""Explicit randomness: every function that draws takes ``random_state``."""

from __future__ import annotations

import numpy as np

def as_generator(random_state: int | np.random.SeedSequence | np.random.Generator | None) -> np.random.Generator:
    """Turn ``random_state`` into a :class:`numpy.random.Generator`.

    An int or a ``SeedSequence`` gives a new generator seeded with it; a ``Generator`` is
    returned as it is (so the caller's stream advances); ``None`` gives fresh OS entropy.
    """
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, (int, np.integer, np.random.SeedSequence)):
        if isinstance(random_state, (int, np.integer)) and random_state < 0:
            raise ValueError(f"random_state must be a non-negative int, got {random_state}")
        return np.random.default_rng(random_state)
    raise TypeError(
        f"random_state must be an int, a numpy SeedSequence or Generator, or None; got {type(random_state).__name__}"
    )


def int_seed(rng: np.random.Generator) -> int:
    """Draw a 31-bit integer seed from ``rng`` for libraries that want an int (scikit-learn, torch)."""
    return int(rng.integers(0, 2**31 - 1))
