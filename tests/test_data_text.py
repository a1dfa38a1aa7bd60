"""The two-genre text corpus (issue 18): byte tokens, byte classes, the held-out split, contexts."""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import numpy as np
import pytest

import modlens.data as data
from modlens.data import (
    BYTE_CLASSES,
    GENRES,
    DataCorruptError,
    DataUnavailableError,
    TextDataset,
    byte_classes,
    decode,
    encode,
    load_text,
    make_text_split,
    read_genre,
)
from modlens.data._text import TEXT_FILES, context_starts, split_chunks, windows

SHARED = Path(os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture
def text_root() -> Path:
    if not all((SHARED / "text" / f[0]).is_file() for f in TEXT_FILES.values()):
        pytest.skip(f"text corpus not found under {SHARED}/text (the shared data folder)")
    return SHARED


def _streams(n_prose: int = 5000, n_code: int = 7000) -> dict:
    """Synthetic ASCII streams whose every window is recognizable (a position-dependent pattern)."""
    letters = np.frombuffer(string.ascii_lowercase.encode(), dtype=np.uint8)
    digits = np.frombuffer((string.digits + string.punctuation).encode(), dtype=np.uint8)
    prose = letters[(np.arange(n_prose) * 7 + np.arange(n_prose) // 26) % letters.size]
    code = digits[(np.arange(n_code) * 3 + np.arange(n_code) // 11) % digits.size]
    return {"prose": prose, "code": code}


# ----- tokens and byte classes ------------------------------------------------------------------------
def test_every_ascii_byte_has_one_class():
    ids = np.arange(128)
    classes = byte_classes(ids)
    assert classes.dtype == np.int64 and classes.shape == (128,)
    assert np.bincount(classes, minlength=len(BYTE_CLASSES)).tolist() == [52, 10, 6, 32, 28]
    name = {c: BYTE_CLASSES[k] for c, k in zip(map(chr, range(128)), classes)}
    for c, want in [("a", "letter"), ("Z", "letter"), ("0", "digit"), ("9", "digit"), (" ", "space"),
                    ("\n", "space"), ("\t", "space"), ("\r", "space"), (".", "punctuation"), ("_", "punctuation"),
                    ("#", "punctuation"), ("~", "punctuation"), ("\x00", "other"), ("\x7f", "other"),
                    ("\x1b", "other")]:
        assert name[c] == want, (repr(c), name[c], want)


def test_byte_classes_keep_the_shape_and_refuse_ids_outside_the_vocabulary():
    ids = encode("ab 1;\n").reshape(2, 3)
    assert byte_classes(ids).tolist() == [[0, 0, 2], [1, 3, 2]]
    with pytest.raises(ValueError, match=r"\[0, 127\]"):
        byte_classes([3, 128])
    with pytest.raises(ValueError):
        byte_classes([-1])
    with pytest.raises(TypeError):
        byte_classes(np.array([1.0, 2.0]))


def test_encode_decode_round_trip_and_non_ascii():
    text = "".join(map(chr, range(128)))
    ids = encode(text)
    assert ids.dtype == np.int64 and ids.tolist() == list(range(128))
    assert decode(ids) == text
    assert encode(text.encode()).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="position 3"):
        encode("abc\u00e9d")
    assert decode(encode("abc\u00e9d", errors="drop")) == "abcd"
    with pytest.raises(ValueError, match="errors"):
        encode("a", errors="ignore")
    with pytest.raises(ValueError, match="1-D"):
        decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError):
        decode([200])


# ----- split ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bytes, chunk", [(100_000, 1000), (464_473, 8192), (50_001, 5000)])
def test_split_chunks_is_a_deterministic_partition(n_bytes, chunk):
    n = -(-n_bytes // chunk)
    parts = split_chunks(n_bytes, genre="prose", seed=3, chunk_bytes=chunk)
    assert set(parts) == {"train", "val", "test"}
    everything = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(everything), np.arange(n))  # disjoint, and every chunk somewhere
    assert len(parts["test"]) == len(parts["val"]) == max(1, round(0.1 * n))
    again = split_chunks(n_bytes, genre="prose", seed=3, chunk_bytes=chunk)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = split_chunks(n_bytes, genre="prose", seed=4, chunk_bytes=chunk)
    assert not np.array_equal(parts["test"], other["test"])
    code = split_chunks(n_bytes, genre="code", seed=3, chunk_bytes=chunk)
    assert not np.array_equal(parts["test"], code["test"])  # genres are split independently


def test_split_chunks_arguments():
    parts = split_chunks(10_000, genre="code", seed=0, chunk_bytes=100, fractions={"train": 0.5, "activation": 0.2,
                                                                                   "test": 0.3})
    assert [len(parts[k]) for k in ("train", "val", "test")] == [50, 20, 30]
    none_held = split_chunks(1000, genre="code", seed=0, chunk_bytes=100, fractions={"train": 1, "val": 0, "test": 0})
    assert len(none_held["train"]) == 10 and len(none_held["val"]) == len(none_held["test"]) == 0
    with pytest.raises(ValueError, match="too few"):
        split_chunks(150, genre="code", seed=0, chunk_bytes=100)  # 2 chunks: none left for training
    with pytest.raises(ValueError, match="sum to 1"):
        split_chunks(10_000, genre="code", seed=0, fractions={"train": 0.8, "val": 0.1, "test": 0.2})
    with pytest.raises(ValueError, match="train, val and test"):
        split_chunks(10_000, genre="code", seed=0, fractions={"train": 0.9, "test": 0.1})
    with pytest.raises(ValueError, match="seed"):
        split_chunks(10_000, genre="code", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        split_chunks(10_000, genre="code", seed=1.5)


def test_three_chunks_leave_one_for_training():
    parts = split_chunks(300, genre="prose", seed=0, chunk_bytes=100)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [1, 1, 1]


# ----- contexts ------------------------------------------------------------------------------------------
def test_windows_stay_inside_their_chunk_and_cover_it():
    starts = context_starts(1050, np.array([0, 3, 10]), context=16, chunk_bytes=100)
    # chunk 0: bytes 0..99 -> windows at 0, 16, ..., 80 (80 + 16 = 96 <= 99); chunk 10: bytes 1000..1049 -> 1000, 1016, 1032
    assert starts.tolist() == [0, 16, 32, 48, 64, 80, 300, 316, 332, 348, 364, 380, 1000, 1016, 1032]
    assert np.all(starts // 100 == (starts + 16) // 100)
    data_ = np.arange(1050) % 128
    ids, targets = windows(data_, starts, 16)
    assert ids.shape == targets.shape == (15, 16) and ids.dtype == targets.dtype == np.int64
    assert np.array_equal(ids, data_[starts[:, None] + np.arange(16)])
    assert np.array_equal(targets, data_[starts[:, None] + np.arange(1, 17)])


@pytest.mark.parametrize("context", [1, 16, 63])
def test_synthetic_split_contexts_targets_and_genres(context):
    streams = _streams()
    chunk = 256
    sets = {s: make_text_split(streams, s, context=context, seed=5, chunk_bytes=chunk) for s in ("train", "val", "test")}
    used = {g: np.zeros(streams[g].size, dtype=np.int64) for g in GENRES}
    for name, d in sets.items():
        assert isinstance(d, TextDataset) and d.split == name and d.context == context
        assert d.ids.shape == d.targets.shape == (len(d), context)
        assert np.array_equal(d.targets[:, :-1], d.ids[:, 1:])  # the target of t is the token at t + 1
        for gi, g in enumerate(GENRES):
            rows = d.genre == gi
            assert rows.any()
            src = streams[g]
            off = d.offset[rows]
            assert np.array_equal(d.ids[rows], src[off[:, None] + np.arange(context)])
            assert np.array_equal(d.targets[rows, -1], src[off + context])
            assert np.all(off // chunk == (off + context) // chunk)  # never across a chunk boundary
            for o in off:
                used[g][o:o + context + 1] += 1 if name == "train" else 1000
        assert np.array_equal(d.position_genre(), np.repeat(d.genre[:, None], context, axis=1))
        assert np.array_equal(d.target_classes(), byte_classes(d.targets))
    for g in GENRES:  # a byte is in training windows or in held-out windows, never both
        u = used[g]
        assert not np.any((u % 1000 > 0) & (u >= 1000)), g
    # the split does not depend on the context length: the same chunks are held out
    other = make_text_split(streams, "test", context=context + 5, seed=5, chunk_bytes=chunk)
    for gi in range(2):
        a = set(sets["test"].offset[sets["test"].genre == gi] // chunk)
        b = set(other.offset[other.genre == gi] // chunk)
        assert b <= a and len(b) > 0


def test_split_is_a_function_of_the_seed_only():
    streams = _streams()
    np.random.seed(1)
    a = make_text_split(streams, "train", context=8, seed=2, chunk_bytes=128)
    np.random.seed(99)  # the global generator plays no part
    b = make_text_split(streams, "train", context=8, seed=2, chunk_bytes=128)
    c = make_text_split(streams, "train", context=8, seed=3, chunk_bytes=128)
    for f in ("ids", "targets", "genre", "offset"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.offset, c.offset)


def test_balanced_subsets_and_next_token_attributes():
    ds = make_text_split(_streams(20000, 30000), "train", context=32, seed=0, chunk_bytes=1024)
    sub = ds.balanced(10, seed=3)
    assert sub.genre_counts() == {"prose": 5, "code": 5} and np.all(np.diff(sub.offset[sub.genre == 1]) > 0)
    assert sub.balanced(10, seed=3) is sub and ds.balanced(10, seed=3).ids.tolist() == sub.ids.tolist()
    assert ds.balanced(10, seed=4).ids.tolist() != sub.ids.tolist()
    few = ds.subset(np.r_[np.flatnonzero(ds.genre == 0)[:2], np.flatnonzero(ds.genre == 1)])
    assert few.balanced(8).genre_counts() == {"prose": 2, "code": 6}   # the other genre fills the share
    np.testing.assert_array_equal(ds.position_labels(), ds.position_genre())
    assert ds.token_class_names == BYTE_CLASSES and ds.label_names == GENRES and ds.token_classes.shape == (128,)


def test_make_text_split_arguments():
    streams = _streams()
    with pytest.raises(ValueError, match="chunks of at least 129 bytes"):
        make_text_split(streams, "train", context=128, chunk_bytes=128)
    with pytest.raises(ValueError, match="unknown split"):
        make_text_split(streams, "dev", context=8)
    with pytest.raises(ValueError, match="context"):
        make_text_split(streams, "train", context=0)
    with pytest.raises(ValueError, match="genres"):
        make_text_split({"prose": streams["prose"]}, "train", context=8)
    bad = dict(streams, code=np.array([1, 2, 200], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 127\]"):
        make_text_split(bad, "train", context=1, chunk_bytes=2, fractions={"train": 1, "val": 0, "test": 0})
    as_bytes = {g: s.tobytes() for g, s in streams.items()}
    x = make_text_split(as_bytes, "val", context=8, chunk_bytes=128)
    y = make_text_split(streams, "activation", context=8, chunk_bytes=128)
    assert y.split == "val" and np.array_equal(x.ids, y.ids)


# ----- the real corpus -------------------------------------------------------------------------------------
def test_real_files_pass_their_checksums(text_root):
    for genre, (_, size, _, _) in TEXT_FILES.items():
        raw = read_genre(genre, text_root)
        assert raw.dtype == np.uint8 and raw.size == size and int(raw.max()) < 128
        assert not raw.flags.writeable


def test_real_split_sizes_and_no_shared_bytes(text_root):
    sets = {s: load_text(s, context=128, seed=0, data_dir=text_root) for s in ("train", "val", "test")}
    # prose: 56 chunks of 8,192 bytes (63 windows each) and one of 5,721 (44 windows), 6 test and 6 val;
    # code: 118 full chunks and one of 6,692 bytes (52 windows), 12 test and 12 val. With seed 0 both
    # short chunks are training chunks.
    assert sets["test"].genre_counts() == {"prose": 6 * 63, "code": 12 * 63}
    assert sets["val"].genre_counts() == {"prose": 6 * 63, "code": 12 * 63}
    assert sets["train"].genre_counts() == {"prose": 56 * 63 + 44 - 12 * 63, "code": 118 * 63 + 52 - 24 * 63}
    for gi, genre in enumerate(GENRES):
        raw = read_genre(genre, text_root)
        owner = np.full(raw.size, -1)
        for k, name in enumerate(("train", "val", "test")):
            d = sets[name]
            off = d.offset[d.genre == gi]
            assert np.array_equal(d.ids[d.genre == gi], raw[off[:, None] + np.arange(128)])
            cover = (off[:, None] + np.arange(129)).ravel()
            assert np.all((owner[cover] == -1) | (owner[cover] == k)), (genre, name)
            owner[cover] = k
    prose = decode(sets["test"].ids[sets["test"].genre == 0].ravel())
    code = decode(sets["test"].ids[sets["test"].genre == 1].ravel())
    assert prose.count("def ") < code.count("def ") and code.count("self") > prose.count("self")


def test_damaged_or_missing_files_are_refused(text_root, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "text").mkdir(parents=True)
    shutil.copy(text_root / "text" / "code.txt", root / "text" / "code.txt")
    raw = bytearray((text_root / "text" / "prose.txt").read_bytes())
    raw[1000] = ord("x") if raw[1000] != ord("x") else ord("y")
    (root / "text" / "prose.txt").write_bytes(bytes(raw))
    with pytest.raises(DataCorruptError, match="md5 .*sha256") as info:
        load_text("test", data_dir=root)
    assert "prose.txt" in str(info.value) and "expected 464,473" not in str(info.value)  # same size, other bytes
    (root / "text" / "prose.txt").write_bytes(bytes(raw[:-1]))
    with pytest.raises(DataCorruptError, match="464,472 bytes, expected 464,473"):
        read_genre("prose", root)
    (root / "text" / "prose.txt").unlink()
    monkeypatch.setenv("MODLENS_DATA", str(root))
    with pytest.raises(DataUnavailableError, match="MODLENS_DATA") as info:
        load_text("train")
    assert str(root / "text" / "prose.txt") in str(info.value)
    assert read_genre("code").size == TEXT_FILES["code"][1]  # found through MODLENS_DATA
    with pytest.raises(ValueError, match="genre"):
        read_genre("poetry", root)


def test_exports():
    for name in ("load_text", "make_text_split", "TextDataset", "encode", "decode", "byte_classes", "read_genre",
                 "GENRES", "BYTE_CLASSES"):
        assert name in data.__all__ and hasattr(data, name)
    assert GENRES == ("prose", "code") and BYTE_CLASSES == ("letter", "digit", "space", "punctuation", "other")
