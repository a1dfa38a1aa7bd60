"""Tests of modlens.data: IDX parsing, checksums, missing files, derived datasets, digits split."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import modlens.data as data
from modlens.data import (
    DATASETS,
    DataCorruptError,
    DataUnavailableError,
    Dataset,
    load_dataset,
    make_halves,
    make_stack,
    resize_half_width,
)
from modlens.data._digits import split_indices
from modlens.data._idx import check_pair, gunzip, parse_idx, read_idx_images, read_idx_labels
from modlens.data._sources import MD5, SPLIT_FILES

SHARED = Path(os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def real_root() -> Path:
    if not (SHARED / "mnist").is_dir() or not (SHARED / "fashion-mnist").is_dir():
        pytest.skip(f"real MNIST/Fashion-MNIST files not found under {SHARED} (offline copy missing)")
    return SHARED


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(("name", "mean"), [("mnist", 0.1307), ("fashion-mnist", 0.2860)])
def test_real_train(real_root, name, mean):
    d = load_dataset(name, "train", data_dir=real_root, download=False)
    assert isinstance(d, Dataset) and len(d) == 60000
    assert d.x.shape == (60000, 1, 28, 28) and d.x.dtype == np.float32
    assert d.y.shape == (60000,) and d.y.dtype == np.int64
    assert d.x.min() == 0.0 and d.x.max() == 1.0
    assert abs(d.x.mean(dtype=np.float64) - mean) < 1e-4
    assert d.n_classes == 10 and set(np.unique(d.y)) == set(range(10))


def test_real_test_label_counts(real_root):
    d = load_dataset("mnist", "test", data_dir=real_root, download=False)
    assert d.x.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    f = load_dataset("fashion-mnist", "test", data_dir=real_root, download=False)
    assert np.bincount(f.y, minlength=10).tolist() == [1000] * 10


def test_returned_arrays_do_not_share_the_cache(real_root):
    a = load_dataset("mnist", "test", data_dir=real_root, download=False)
    a.x[:] = 0.5
    a.y[:] = 3
    b = load_dataset("mnist", "test", data_dir=real_root, download=False)
    assert np.bincount(b.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert b.x.max() == 1.0 and b.x.min() == 0.0


def test_env_var_is_honoured(real_root, monkeypatch, tmp_path):
    monkeypatch.setenv("MODLENS_DATA", str(real_root))
    assert len(load_dataset("mnist", "test", download=False)) == 10000
    monkeypatch.setenv("MODLENS_DATA", str(tmp_path))
    with pytest.raises(DataUnavailableError, match="MODLENS_DATA") as info:
        load_dataset("mnist", "test", download=False)
    assert str(tmp_path / "mnist") in str(info.value)
    # data_dir wins over the environment variable
    assert len(load_dataset("mnist", "test", data_dir=real_root, download=False)) == 10000


def test_default_root_without_env(monkeypatch):
    monkeypatch.delenv("MODLENS_DATA", raising=False)
    assert data.data_root() == (Path.home() / ".cache" / "modlens" / "data").resolve()


# --------------------------------------------------------------------------- missing / corrupt files


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "fashion-mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert "data_dir" in msg and "MODLENS_DATA" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_leaves_nothing(tmp_path):
    with pytest.raises(DataUnavailableError, match="download failed") as info:
        load_dataset("mnist", "test", data_dir=tmp_path, download=True)
    assert "ossci-datasets" in str(info.value)
    assert list((tmp_path / "mnist").iterdir()) == []


def _serve(payloads: dict[str, bytes]):
    class Response(io.BytesIO):
        def __exit__(self, *exc):
            self.close()

    def urlopen(request, timeout=None):
        url = request.full_url if hasattr(request, "full_url") else request
        return Response(payloads[url.rsplit("/", 1)[1]])

    return urlopen


def test_download_checks_md5_then_renames(real_root, tmp_path, monkeypatch):
    names = SPLIT_FILES["test"]
    good = {n: (real_root / "mnist" / n).read_bytes() for n in names}
    monkeypatch.setattr(urllib.request, "urlopen", _serve(good))
    d = load_dataset("mnist", "test", data_dir=tmp_path)
    assert np.bincount(d.y).tolist() == MNIST_TEST_COUNTS
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(names)

    bad = {n: b"not the real file" for n in names}
    monkeypatch.setattr(urllib.request, "urlopen", _serve(bad))
    with pytest.raises(DataUnavailableError, match="md5"):
        load_dataset("mnist", "test", data_dir=tmp_path / "other")
    assert list((tmp_path / "other" / "mnist").iterdir()) == []


def test_wrong_md5_raises_corrupt(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for n in SPLIT_FILES["test"]:
        (folder / n).write_bytes(gzip.compress(b"garbage", mtime=0))
    with pytest.raises(DataCorruptError) as info:
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg
    assert MD5["mnist"]["t10k-images-idx3-ubyte.gz"] in msg
    assert hashlib.md5(gzip.compress(b"garbage", mtime=0)).hexdigest() in msg
    assert "delete" in msg and "\n" not in msg


# --------------------------------------------------------------------------- IDX parser


def _images_bytes(n=3, rows=2, cols=4, magic=2051, payload=None) -> bytes:
    body = bytes(range(n * rows * cols)) if payload is None else payload
    return struct.pack(">IIII", magic, n, rows, cols) + body


def _labels_bytes(labels=(1, 2, 3), magic=2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def test_idx_roundtrip_through_gzip():
    raw = gunzip(gzip.compress(_images_bytes()))
    imgs = read_idx_images(raw)
    assert imgs.shape == (3, 2, 4) and imgs.dtype == np.uint8
    assert imgs[1, 0].tolist() == [8, 9, 10, 11]
    assert not imgs.flags.writeable
    labels = read_idx_labels(gunzip(gzip.compress(_labels_bytes())))
    assert labels.tolist() == [1, 2, 3]
    check_pair(imgs, labels, image_shape=(2, 4), n_classes=10)


@pytest.mark.parametrize(
    ("blob", "reader", "pattern"),
    [
        (_images_bytes(magic=2049), read_idx_images, "magic"),
        (_labels_bytes(magic=2051), read_idx_labels, "magic"),
        (_images_bytes(magic=0x01000803), read_idx_images, "magic"),
        (_images_bytes(payload=bytes(23)), read_idx_images, "too short"),
        (_images_bytes(payload=bytes(25)), read_idx_images, "too long"),
        (struct.pack(">II", 2051, 3), read_idx_images, "header truncated"),
        (b"\x00\x00", read_idx_labels, "too short"),
    ],
)
def test_idx_parser_rejects_bad_data(blob, reader, pattern):
    with pytest.raises(DataCorruptError, match=pattern):
        reader(blob, "fake.idx")


def test_idx_parser_other_errors():
    with pytest.raises(DataCorruptError, match="element type"):
        parse_idx(struct.pack(">II", 0x00000D01, 1) + bytes(4))
    with pytest.raises(DataCorruptError, match="gzip"):
        gunzip(b"this is not gzip", "x.gz")
    with pytest.raises(DataCorruptError, match="gzip"):
        gunzip(gzip.compress(_labels_bytes())[:-6], "x.gz")
    imgs = read_idx_images(_images_bytes(n=3))
    with pytest.raises(DataCorruptError, match="3 images but 2 labels"):
        check_pair(imgs, read_idx_labels(_labels_bytes((1, 2))))
    with pytest.raises(DataCorruptError, match="out of range"):
        check_pair(imgs, read_idx_labels(_labels_bytes((1, 2, 10))), n_classes=10)
    with pytest.raises(DataCorruptError, match="expected 28x28"):
        check_pair(imgs, read_idx_labels(_labels_bytes()), image_shape=(28, 28))


# --------------------------------------------------------------------------- names, splits, API


def test_names_and_errors():
    assert len(DATASETS) == 16 and len(set(DATASETS)) == 16
    for n in ("mnist", "fashion-mnist", "digits", "cifar10", "halves-mnist", "stack-same-fashion-mnist", "halves-digits"):
        assert n in DATASETS
    with pytest.raises(ValueError, match="valid names: mnist"):
        load_dataset("cifar100", "train")
    with pytest.raises(ValueError, match="carve"):
        load_dataset("mnist", "val", download=False)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="seed"):
        load_dataset("halves-digits", "train", seed=-1)


def test_dataset_is_frozen():
    d = load_dataset("digits", "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.x = d.x  # type: ignore[misc]
    assert len(d) == d.x.shape[0] and "digits" in repr(d)


def test_no_torch_import():
    code = (
        "import sys, modlens.data as d; d.load_dataset('halves-digits', 'train'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- digits


def test_digits_split():
    parts = {s: load_dataset("digits", s) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 1797
    assert parts["train"].x.shape[1:] == (1, 8, 8)
    assert all(p.x.dtype == np.float32 and p.x.min() >= 0 and p.x.max() <= 1 for p in parts.values())
    from sklearn.datasets import load_digits

    y_all = load_digits().target
    idx = split_indices(y_all)
    cat = np.concatenate(list(idx.values()))
    assert sorted(cat.tolist()) == list(range(1797))  # disjoint and complete
    counts = np.bincount(y_all)
    for split, frac in (("train", 0.60), ("val", 0.15), ("test", 0.25)):
        per_class = np.bincount(y_all[idx[split]], minlength=10)
        assert np.all(np.abs(per_class - frac * counts) <= 1.0), split
        np.testing.assert_array_equal(parts[split].y, y_all[idx[split]])
    # fixed: independent of the seed argument and of repeated calls
    again = load_dataset("digits", "test", seed=123)
    np.testing.assert_array_equal(again.x, parts["test"].x)
    np.testing.assert_array_equal(split_indices(y_all)["test"], idx["test"])


# --------------------------------------------------------------------------- derived datasets


def test_resize_half_width_hand_example():
    x = np.array([[[[0, 1, 2, 3], [4, 4, 0, 1]]]], dtype=np.float32)
    out = resize_half_width(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[[0.5, 2.5], [4.0, 0.5]]]])
    with pytest.raises(ValueError, match="odd"):
        resize_half_width(np.zeros((1, 1, 2, 3)))


def _toy(n=200, seed=1):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 6, 8), dtype=np.float32), rng.integers(0, 10, size=n)


def test_make_halves_labels_and_pixels():
    x, y = _toy()
    out, lab, j = make_halves(x, y, np.random.default_rng(0), return_indices=True)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(lab, (y + y[j]) % 10)
    np.testing.assert_array_equal(out[..., :4], resize_half_width(x))
    np.testing.assert_array_equal(out[..., 4:], resize_half_width(x[j]))
    assert len(np.unique(j)) > 100  # partners really vary


def test_make_halves_same_class():
    x, y = _toy()
    out, lab, j = make_halves(x, y, np.random.default_rng(0), same=True, return_indices=True)
    np.testing.assert_array_equal(lab, y)
    np.testing.assert_array_equal(y[j], y)
    np.testing.assert_array_equal(out[..., 4:], resize_half_width(x[j]))


def test_make_stack():
    x, y = _toy()
    out, lab, j = make_stack(x, y, np.random.default_rng(0), return_indices=True)
    assert out.shape == (200, 2, 6, 8)
    np.testing.assert_array_equal(out[:, 0], x[:, 0])
    np.testing.assert_array_equal(out[:, 1], x[j, 0])
    np.testing.assert_array_equal(lab, (y + y[j]) % 10)
    out, lab, j = make_stack(x, y, np.random.default_rng(0), same=True, return_indices=True)
    np.testing.assert_array_equal(lab, y)
    np.testing.assert_array_equal(y[j], y)


def test_derived_determinism_and_seeds():
    a = load_dataset("halves-digits", "train", seed=3)
    b = load_dataset("halves-digits", "train", seed=3)
    c = load_dataset("halves-digits", "train", seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    s = load_dataset("stack-diff-digits", "val", seed=3)
    assert s.x.shape == (269, 2, 8, 8) and s.x.dtype == np.float32


@pytest.mark.parametrize("name", [n for n in DATASETS if n.endswith("-digits")])
def test_load_derived_matches_pure_functions(name):
    base = load_dataset("digits", "test")
    d = load_dataset(name, "test", seed=7)
    same = "-same-" in name
    make = make_halves if name.startswith("halves") else make_stack
    x, y, j = make(base.x, base.y, data.derived_rng(name, "test", 7), same=same, return_indices=True)
    np.testing.assert_array_equal(d.x, x)
    np.testing.assert_array_equal(d.y, y)
    expected = base.y if same else (base.y + base.y[j]) % 10
    np.testing.assert_array_equal(d.y, expected)
    assert d.x.shape == ((451, 2, 8, 8) if name.startswith("stack") else (451, 1, 8, 8))


def test_derived_mnist(real_root):
    d = load_dataset("halves-mnist", "test", data_dir=real_root, download=False, seed=0)
    base = load_dataset("mnist", "test", data_dir=real_root, download=False)
    assert d.x.shape == (10000, 1, 28, 28) and d.x.min() >= 0 and d.x.max() <= 1
    np.testing.assert_array_equal(d.x[..., :14], resize_half_width(base.x))
    s = load_dataset("stack-same-mnist", "test", data_dir=real_root, download=False)
    assert s.x.shape == (10000, 2, 28, 28)
    np.testing.assert_array_equal(s.y, base.y)
