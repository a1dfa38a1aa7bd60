"""The two-genre text corpus for language models: byte-level tokens, a held-out split, contexts.

Files: ``<root>/text/prose.txt`` (English prose) and ``<root>/text/code.txt`` (Python source),
ASCII only, with the sizes and checksums of the shared data folder's README (``root`` as for
MNIST: ``data_dir``, else ``$MODLENS_DATA``, else ``~/.cache/modlens/data``). Nothing is
downloaded: the corpus is not a standard distribution file.

* **Tokens.** One token per byte, ids ``0..127`` (ASCII); :func:`encode` / :func:`decode`.
* **Byte classes** of a token (:data:`BYTE_CLASSES`): letter, digit, space (any ASCII
  whitespace: space, tab, newline, carriage return, vertical tab, form feed), punctuation
  (the 32 printable ASCII symbols that are neither letters, digits nor space) and other
  (the remaining control characters and DEL); :func:`byte_classes`.
* **Genres**: prose = 0, code = 1 (:data:`GENRES`); every sequence comes from one file, so the
  genre of each of its positions is the genre of the sequence.
* **Split.** Each file is cut into contiguous chunks of ``chunk_bytes`` bytes (the last one
  shorter); the chunks of each genre are ordered by a hash of ``(seed, genre, chunk index)``
  and the first ``round(fraction * n_chunks)`` go to ``test``, the next to ``val`` (the
  activation data, also called ``activation``), the rest to ``train``. The split is a pure
  function of the seed, the fractions, ``chunk_bytes`` and the files, stable across numpy
  versions, and the same for every context length; no byte of a held-out sequence (inputs or
  targets) lies in a training sequence.
* **Contexts.** Inside each chunk, windows of ``context + 1`` bytes start every ``context``
  bytes (a window never crosses a chunk boundary; the tail shorter than a window is dropped):
  ``ids[i]`` = the first ``context`` bytes, ``targets[i]`` = the last ``context`` (the next
  token of every position: ``targets[i, t] == ids[i, t + 1]`` for ``t < context - 1``).

Uses numpy and the standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._errors import DataCorruptError, DataUnavailableError
from ._sources import ENV_VAR, data_root

VOCAB_SIZE = 128
GENRES = ("prose", "code")
BYTE_CLASSES = ("letter", "digit", "space", "punctuation", "other")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"activation": "val", "validation": "val"}
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_CHUNK_BYTES = 8192
TEXT_DIR = "text"

# size, md5, sha256 as documented in the shared data folder's README.
TEXT_FILES = {
    "prose": ("prose.txt", 464_473, "9714430345d5442c04e5d592fd5518fa",
              "b61d082f373f608306b71e4b69c64ac24b650139c6f185e038e420244affbc70"),
    "code": ("code.txt", 973_348, "beec8414d2fe4758eed01298fab7d43b",
             "077c2888155ba1fb03d4a84879d72a4601b6da39824d346b353704bbb7e94ce9"),
}


def _class_table() -> np.ndarray:
    table = np.full(VOCAB_SIZE, BYTE_CLASSES.index("other"), dtype=np.int64)
    for chars, name in ((string.ascii_letters, "letter"), (string.digits, "digit"),
                        (string.whitespace, "space"), (string.punctuation, "punctuation")):
        table[[ord(c) for c in chars]] = BYTE_CLASSES.index(name)
    table.flags.writeable = False
    return table


BYTE_CLASS_OF = _class_table()
"""``BYTE_CLASS_OF[token]``: the index in :data:`BYTE_CLASSES` of each of the 128 tokens."""


# ----- tokens -----------------------------------------------------------------------------------------
def encode(text: str | bytes, *, errors: str = "strict") -> np.ndarray:
    """Token ids (int64) of ``text``: one per byte. Non-ASCII characters raise ``ValueError``
    (``errors="strict"``) or are dropped (``errors="drop"``, as the corpus was made)."""
    if errors not in ("strict", "drop"):
        raise ValueError(f"errors must be 'strict' or 'drop', got {errors!r}")
    if isinstance(text, str):
        raw = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
    ids = np.frombuffer(raw, dtype=np.uint8)
    if errors == "drop":
        ids = ids[ids < VOCAB_SIZE]
    elif ids.size and int(ids.max()) >= VOCAB_SIZE:
        pos = int(np.argmax(ids >= VOCAB_SIZE))
        raise ValueError(f"byte {int(ids[pos])} at position {pos} is not ASCII; the vocabulary is the "
                         f"{VOCAB_SIZE} ASCII bytes (pass errors='drop' to drop such characters)")
    return ids.astype(np.int64)


def _check_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE - 1}], got [{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(np.int64, copy=False)


def decode(ids) -> str:
    """The ASCII text of a 1-D sequence of token ids."""
    arr = _check_ids(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode takes one sequence (1-D ids), got shape {arr.shape}")
    return arr.astype(np.uint8).tobytes().decode("ascii")


def byte_classes(ids) -> np.ndarray:
    """The byte class (index in :data:`BYTE_CLASSES`) of every token id, same shape as ``ids``."""
    return BYTE_CLASS_OF[_check_ids(ids)]


# ----- files --------------------------------------------------------------------------------------------
def text_path(genre: str, data_dir: str | os.PathLike | None = None) -> Path:
    _check_genre(genre)
    return data_root(data_dir) / TEXT_DIR / TEXT_FILES[genre][0]


def _check_genre(genre: str) -> None:
    if genre not in GENRES:
        raise ValueError(f"unknown genre {genre!r}; use one of: {', '.join(GENRES)}")


def read_genre(genre: str, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The checked bytes of one genre's file as a read-only uint8 array (size, md5 and sha256
    as documented; every byte ASCII)."""
    path = text_path(genre, data_dir)
    if not path.is_file():
        raise DataUnavailableError(
            f"text corpus file missing: {path}. Put prose.txt and code.txt (the two-genre corpus of the shared "
            f"data folder) in {path.parent}, or point to a folder that holds {TEXT_DIR}/ with data_dir=... or "
            f"the {ENV_VAR} environment variable."
        )
    st = path.stat()
    return _read_cached(str(path), st.st_size, st.st_mtime_ns, genre)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int, genre: str) -> np.ndarray:
    _, want_size, want_md5, want_sha = TEXT_FILES[genre]
    raw = Path(path).read_bytes()
    problems = []
    if len(raw) != want_size:
        problems.append(f"{len(raw):,} bytes, expected {want_size:,}")
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if md5 != want_md5:
        problems.append(f"md5 {md5}, expected {want_md5}")
    sha = hashlib.sha256(raw).hexdigest()
    if sha != want_sha:
        problems.append(f"sha256 {sha}, expected {want_sha}")
    if problems:
        raise DataCorruptError(f"{path}: {'; '.join(problems)}; the file is damaged or not the documented "
                               "corpus file: copy in a good one")
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size and int(data.max()) >= VOCAB_SIZE:  # cannot happen with the right checksums
        raise DataCorruptError(f"{path}: contains non-ASCII bytes")
    data.flags.writeable = False
    return data


# ----- split and contexts -------------------------------------------------------------------------------
def canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)} (or 'activation' for 'val')")
    return split


def _check_fractions(fractions) -> dict[str, float]:
    if fractions is None:
        return dict(DEFAULT_FRACTIONS)
    out = {canonical_split(k): float(v) for k, v in dict(fractions).items()}
    if set(out) != set(SPLITS):
        raise ValueError(f"fractions must give train, val and test, got {sorted(out)}")
    if any(not (0.0 <= v <= 1.0) for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-9:
        raise ValueError(f"fractions must lie in [0, 1] and sum to 1, got {out}")
    if out["train"] <= 0:
        raise ValueError("the train fraction must be positive")
    return out


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _order_key(seed: int, genre: str, chunk: int) -> int:
    # A hash, not a numpy stream: the split must not change with numpy's generator algorithms.
    digest = hashlib.blake2b(f"modlens-text-split:{seed}:{genre}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_chunks(n_bytes: int, *, genre: str, seed: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 fractions=None) -> dict[str, np.ndarray]:
    """Chunk indices (sorted int64) of each split for a file of ``n_bytes`` bytes: chunk ``c``
    covers bytes ``[c * chunk_bytes, min((c + 1) * chunk_bytes, n_bytes))``.

    Held-out splits with a positive fraction get at least one chunk; train gets the rest (at
    least one)."""
    n_bytes = _check_int("n_bytes", n_bytes, 1)
    chunk_bytes = _check_int("chunk_bytes", chunk_bytes, 2)
    seed = _check_int("seed", seed, 0)
    fr = _check_fractions(fractions)
    n = -(-n_bytes // chunk_bytes)
    order = np.array(sorted(range(n), key=lambda c: _order_key(seed, genre, c)), dtype=np.int64)
    counts = {s: (max(1, round(fr[s] * n)) if fr[s] > 0 else 0) for s in ("test", "val")}
    if counts["test"] + counts["val"] >= n:
        raise ValueError(f"{genre}: {n} chunk(s) of {chunk_bytes} bytes are too few for the held-out fractions "
                         f"{fr}; use smaller chunks")
    out = {"test": order[:counts["test"]], "val": order[counts["test"]:counts["test"] + counts["val"]],
           "train": order[counts["test"] + counts["val"]:]}
    return {k: np.sort(v) for k, v in out.items()}


def context_starts(n_bytes: int, chunks: np.ndarray, *, context: int, chunk_bytes: int) -> np.ndarray:
    """Byte offsets (int64, increasing) of the windows of ``context + 1`` bytes inside ``chunks``."""
    starts = []
    for c in np.asarray(chunks, dtype=np.int64):
        lo, hi = int(c) * chunk_bytes, min((int(c) + 1) * chunk_bytes, n_bytes)
        n = (hi - lo - 1) // context
        if n > 0:
            starts.append(lo + context * np.arange(n, dtype=np.int64))
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, targets)``, both ``(len(starts), context)`` int64, from windows of ``data``."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + 1, dtype=np.int64)
    w = np.asarray(data)[idx].astype(np.int64) if idx.size else np.zeros((0, context + 1), dtype=np.int64)
    return w[:, :-1].copy(), w[:, 1:].copy()


@dataclass(frozen=True, eq=False)
class TextDataset:
    """One split of the text corpus as fixed-length contexts.

    ``ids`` and ``targets``: int64 ``(N, T)``, ``targets[i, t]`` the token after ``ids[i, t]``;
    ``genre``: int64 ``(N,)`` (index in :data:`GENRES`); ``offset``: int64 ``(N,)``, the byte
    offset of ``ids[i, 0]`` in its genre's file.
    """

    split: str
    ids: np.ndarray
    targets: np.ndarray
    genre: np.ndarray
    offset: np.ndarray
    context: int
    seed: int
    chunk_bytes: int
    name: str = "text"
    vocab_size: int = VOCAB_SIZE
    genres: tuple = GENRES

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.ids.shape != (n, self.context) or self.targets.shape != self.ids.shape:
            raise ValueError(f"TextDataset: ids and targets must be (N, {self.context}), got {self.ids.shape} "
                             f"and {self.targets.shape}")
        if self.genre.shape != (n,) or self.offset.shape != (n,):
            raise ValueError(f"TextDataset: genre and offset must be ({n},), got {self.genre.shape}, "
                             f"{self.offset.shape}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def position_genre(self) -> np.ndarray:
        """``(N, T)``: the genre of every position (its sequence's genre)."""
        return np.broadcast_to(self.genre[:, None], self.ids.shape).copy()

    # what next-token analyses read (modlens.nn.tokens.as_token_data): the byte class of every target
    # token, the genre of every position
    @property
    def token_classes(self) -> np.ndarray:
        """The byte class of every token id (index in :data:`BYTE_CLASSES`)."""
        return BYTE_CLASS_OF

    token_class_names = BYTE_CLASSES
    label_names = GENRES

    def position_labels(self) -> np.ndarray:
        """``(N, T)``: the label of every position for coherence: its genre."""
        return self.position_genre()

    def target_classes(self) -> np.ndarray:
        """``(N, T)``: the byte class of every target token (index in :data:`BYTE_CLASSES`)."""
        return byte_classes(self.targets)

    def subset(self, index) -> "TextDataset":
        """The sequences ``index`` (an index array or a slice), in that order."""
        return TextDataset(split=self.split, ids=self.ids[index], targets=self.targets[index], genre=self.genre[index],
                           offset=self.offset[index], context=self.context, seed=self.seed,
                           chunk_bytes=self.chunk_bytes)

    def balanced(self, n: int, seed: int = 0) -> "TextDataset":
        """At most ``n`` sequences, as many of each genre as possible up to ``n // 2`` (the rest from the
        other genre), drawn without replacement by a hash-seeded generator of ``(seed, split)`` and kept
        in their order in the split: a small lesion test or activation set with both genres."""
        n = _check_int("n", n, 1)
        if n >= len(self):
            return self
        rng = np.random.default_rng(np.random.SeedSequence([_check_int("seed", seed, 0), _order_key(0, self.split, n)]))
        members = [np.flatnonzero(self.genre == g) for g in range(len(GENRES))]
        want = [min(len(m), n // len(GENRES)) for m in members]
        spare = n - sum(want)
        for g, m in enumerate(members):  # a genre with too few sequences leaves its share to the other
            extra = min(spare, len(m) - want[g])
            want[g] += extra
            spare -= extra
        pick = np.concatenate([rng.choice(m, size=k, replace=False) for m, k in zip(members, want)])
        return self.subset(np.sort(pick))

    def genre_counts(self) -> dict[str, int]:
        return {g: int((self.genre == i).sum()) for i, g in enumerate(GENRES)}

    def __repr__(self) -> str:
        return (f"TextDataset(split={self.split!r}, ids={self.ids.shape}, genres={self.genre_counts()}, "
                f"seed={self.seed})")


def make_text_split(streams: dict, split: str, *, context: int, seed: int = 0,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, fractions=None) -> TextDataset:
    """The contexts of one split from in-memory streams ``{"prose": ..., "code": ...}`` (uint8
    arrays or bytes of ASCII text; both genres needed). :func:`load_text` calls it on the checked files."""
    split = canonical_split(split)
    context = _check_int("context", context, 1)
    chunk_bytes = _check_int("chunk_bytes", chunk_bytes, 2)
    if context + 1 > chunk_bytes:
        raise ValueError(f"a context of {context} tokens needs chunks of at least {context + 1} bytes, "
                         f"got chunk_bytes={chunk_bytes}")
    if set(streams) != set(GENRES):
        raise ValueError(f"streams must hold exactly the genres {GENRES}, got {sorted(streams)}")
    parts = []
    for gi, genre in enumerate(GENRES):
        s = streams[genre]
        data = np.frombuffer(bytes(s), dtype=np.uint8) if isinstance(s, (bytes, bytearray)) else np.asarray(s)
        _check_ids(data)
        chunks = split_chunks(data.size, genre=genre, seed=seed, chunk_bytes=chunk_bytes, fractions=fractions)[split]
        starts = context_starts(data.size, chunks, context=context, chunk_bytes=chunk_bytes)
        ids, targets = windows(data, starts, context)
        parts.append((ids, targets, np.full(len(starts), gi, dtype=np.int64), starts))
    ids, targets, genre, offset = (np.concatenate(p) for p in zip(*parts))
    return TextDataset(split=split, ids=ids, targets=targets, genre=genre, offset=offset, context=context,
                       seed=int(seed), chunk_bytes=chunk_bytes)


def load_text(split: str, *, context: int = 128, seed: int = 0, data_dir: str | os.PathLike | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, fractions=None) -> TextDataset:
    """One split (``"train"``, ``"val"``/``"activation"``, ``"test"``) of the two-genre corpus
    as contexts of ``context`` tokens (module docstring). ``seed`` fixes which chunks are held
    out; ``fractions`` (default 0.8 / 0.1 / 0.1 of each genre's chunks) a dict over the splits.

    Raises :class:`DataUnavailableError` when a file is missing, :class:`DataCorruptError` when
    its size or checksums differ from the documented ones, ``ValueError`` for bad arguments."""
    split = canonical_split(split)
    streams = {g: read_genre(g, data_dir) for g in GENRES}
    return make_text_split(streams, split, context=context, seed=seed, chunk_bytes=chunk_bytes, fractions=fractions)
