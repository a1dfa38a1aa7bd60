"""Every seed modlens derives, in one place.

``random_state`` arguments accept what scikit-learn accepts: an ``int``, a
:class:`numpy.random.SeedSequence`, a :class:`numpy.random.Generator`, or ``None``.

* :func:`as_generator` turns one into a generator for a single function call.
* :func:`root_seed` turns one into the *root* of an analysis: an int stays an int (so that
  every stream is what it was before this module existed); a ``SeedSequence`` is kept; a
  ``Generator`` gives a root drawn from it once; ``None`` draws fresh OS entropy. The record
  (:func:`seed_record`) is JSON and is written to the manifest; :func:`root_from_record`
  rebuilds the root, so a run made with ``None`` can be repeated exactly.
* :func:`method_seed` derives the seed of one partitioning method and stream from a root,
  independent of the order in which methods run. Streams: 0 clustering, 1 random sets
  (lesions and visualizations share them), 2 graphical-clusterability null draws, 3 the
  positions sampled from token sequences (activation rows, top-activating positions).
* :func:`named_seed`, :func:`tagged_sequence`, :func:`image_seed`, :func:`int_seed`: the
  small derivations of training (augmentation stream), derived datasets, per-image
  visualization seeds, and ints for libraries that want one.
* :func:`derived_seed`: a study's seed of one network, from the study's seed and the digest
  of the network's weights.

Nothing else in modlens derives a seed: every random stream starts from one of these functions.

This module is layer 0: numpy only.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

#: Stream numbers of :func:`method_seed`.
STREAM_CLUSTERING, STREAM_RANDOM_SETS, STREAM_CLUSTERABILITY, STREAM_POSITIONS = 0, 1, 2, 3

_METHOD_IDS = {"weights/global": 0, "weights/local": 1, "activations/global": 2, "activations/local": 3}

RandomState = "int | np.random.SeedSequence | np.random.Generator | None"


def _check_int(value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"random_state must be an int, SeedSequence, Generator or None; got the bool {value}")
    if int(value) < 0:
        raise ValueError(f"random_state must be a non-negative int, got {value}")
    return int(value)


def as_generator(random_state) -> np.random.Generator:
    """Turn ``random_state`` into a :class:`numpy.random.Generator`.

    An int or a ``SeedSequence`` gives a new generator seeded with it; a ``Generator`` is
    returned as it is (so the caller's stream advances); ``None`` gives fresh OS entropy.
    """
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, (int, np.integer)):
        return np.random.default_rng(_check_int(random_state))
    if random_state is None or isinstance(random_state, np.random.SeedSequence):
        return np.random.default_rng(random_state)
    raise TypeError(
        f"random_state must be an int, a numpy SeedSequence or Generator, or None; got {type(random_state).__name__}"
    )


def int_seed(rng: np.random.Generator) -> int:
    """Draw a 31-bit integer seed from ``rng`` for libraries that want an int (scikit-learn, torch)."""
    return int(rng.integers(0, 2**31 - 1))


def root_seed(random_state) -> int | np.random.SeedSequence:
    """The root of an analysis: an int as it is, otherwise a ``SeedSequence``.

    A ``Generator`` is advanced once (128 bits drawn) to make the root; ``None`` draws fresh
    entropy from the operating system.
    """
    if isinstance(random_state, (int, np.integer)):
        return _check_int(random_state)
    if isinstance(random_state, np.random.SeedSequence):
        return random_state
    if isinstance(random_state, np.random.Generator):
        words = random_state.integers(0, 2**32, size=4, dtype=np.uint64)
        return np.random.SeedSequence(int(sum(int(w) << (32 * i) for i, w in enumerate(words))))
    if random_state is None:
        return np.random.SeedSequence()
    raise TypeError(
        f"random_state must be an int, a numpy SeedSequence or Generator, or None; got {type(random_state).__name__}"
    )


def seed_record(root: int | np.random.SeedSequence) -> int | dict:
    """JSON form of a root: the int, or ``{"entropy": ..., "spawn_key": [...]}``."""
    if isinstance(root, (int, np.integer)):
        return int(root)
    entropy = root.entropy
    entropy = [int(e) for e in entropy] if isinstance(entropy, (list, tuple, np.ndarray)) else int(entropy)
    return {"entropy": entropy, "spawn_key": [int(k) for k in root.spawn_key]}


def root_from_record(record) -> int | np.random.SeedSequence:
    """Inverse of :func:`seed_record`."""
    if isinstance(record, (int, np.integer)):
        return _check_int(record)
    if isinstance(record, dict) and "entropy" in record:
        return np.random.SeedSequence(record["entropy"], spawn_key=tuple(record.get("spawn_key", ())))
    raise ValueError(f"not a seed record: {record!r}; expected an int or {{'entropy': ..., 'spawn_key': [...]}}")


def method_seed(random_state, method: str, stream: int = STREAM_CLUSTERING) -> np.random.SeedSequence:
    """Seed of one method's stream, independent of the order methods are run in.

    For an int root ``s`` this is ``SeedSequence([s, method id, stream])`` (unchanged since
    modlens 0.1); for a ``SeedSequence`` root the method and stream extend its spawn key.
    ``random_state`` may also be a ``Generator`` or ``None`` (made a root first; record the
    root with :func:`root_seed` to repeat the run).
    """
    root = root_seed(random_state)
    mid = _METHOD_IDS.get(method, len(_METHOD_IDS))
    if isinstance(root, int):
        return np.random.SeedSequence([root, mid, int(stream)])
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, mid, int(stream)), pool_size=root.pool_size)


def null_seeds(random_state, method: str, n: int) -> tuple[np.random.SeedSequence, list[np.random.SeedSequence]]:
    """Seeds of a clusterability test of ``method`` with ``n`` null networks: the seed of the
    shuffles, and one clustering seed per null network (children of stream 2)."""
    children = method_seed(random_state, method, STREAM_CLUSTERABILITY).spawn(int(n) + 1)
    return children[0], children[1:]


def stable_int(text: str) -> int:
    """A platform-independent 32-bit hash of ``text`` (CRC-32; Python's ``hash`` is salted)."""
    return zlib.crc32(text.encode("utf-8"))


def tagged_sequence(seed: int, *tags: str) -> np.random.SeedSequence:
    """``SeedSequence([seed, crc32(tag), ...])``: the stream of a named purpose of ``seed``."""
    return np.random.SeedSequence([_check_int(seed), *(stable_int(t) for t in tags)])


def named_seed(seed: int, tag: str) -> int:
    """A 32-bit int seed for a named stream of ``seed`` (e.g. training's augmentation)."""
    return int(tagged_sequence(seed, tag).generate_state(1)[0])


def image_seed(base: int, row: int) -> int:
    """The 63-bit seed of visualization image ``row`` of a run whose base seed is ``base``."""
    state = np.random.SeedSequence([int(base), int(row)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)


def derived_seed(*parts) -> int:
    """A 31-bit seed from a ``SeedSequence`` over ``parts``: ints as they are, anything else (a hex
    digest, a name) hashed to a 64-bit int with SHA-256."""
    words = []
    for p in parts:
        if isinstance(p, (int, np.integer)):
            words.append(int(p))
        else:
            words.append(int(hashlib.sha256(str(p).encode()).hexdigest()[:16], 16))
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)
