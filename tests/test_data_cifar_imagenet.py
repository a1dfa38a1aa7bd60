"""CIFAR-10 and ImageNet-folder loaders, tested on small files in the real formats that the tests write."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from modlens.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataCorruptError,
    DataUnavailableError,
    index_image_folder,
    iter_imagenet_folder,
    load_dataset,
    load_imagenet_folder,
    preprocess_image,
)
from modlens.data import _cifar

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write and read the test images")

BATCH_SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 3, "data_batch_4": 1, "data_batch_5": 2,
               "test_batch": 4}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------- CIFAR-10 files


class _Py2Pickler(pickle._Pickler):
    """Writes strings as Python 2 did (byte strings), so the files look like the real CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2's numpy named its array helper numpy.core.multiarray (numpy 2 calls it numpy._core...)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    raw = _py2_pickle({"batch_label": f"batch {seed}", "labels": labels, "data": data,
                       "filenames": [f"img_{i}.png" for i in range(n)]})
    return raw, data, labels


@pytest.fixture
def cifar_files(monkeypatch):
    """Fake batch files (name -> (bytes, data, labels)) whose md5s replace the published ones."""
    files = {name: _batch(n, seed) for seed, (name, n) in enumerate(BATCH_SIZES.items())}
    files["batches.meta"] = (_py2_pickle({"label_names": list(_cifar.CLASSES)}), None, None)
    monkeypatch.setattr(_cifar, "MD5", {n: hashlib.md5(f[0]).hexdigest() for n, f in files.items()})
    return files


def _write_folder(root, files):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (raw, _, _) in files.items():
        (folder / name).write_bytes(raw)
    return folder


def test_cifar_train_and_test(tmp_path, cifar_files):
    _write_folder(tmp_path, cifar_files)
    train = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert train.x.shape == (11, 3, 32, 32) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.n_classes == 10 and train.name == "cifar10"
    data = np.concatenate([cifar_files[f"data_batch_{i}"][1] for i in range(1, 6)])
    labels = sum((cifar_files[f"data_batch_{i}"][2] for i in range(1, 6)), [])
    assert train.y.tolist() == labels
    # channel-major rows: value c * 1024 + row * 32 + col is channel c at (row, col)
    n, c, r, col = 7, 2, 5, 30
    assert train.x[n, c, r, col] == np.float32(data[n, c * 1024 + r * 32 + col]) / np.float32(255)
    np.testing.assert_array_equal(train.x, data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255))
    test = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert len(test) == 4 and test.y.tolist() == cifar_files["test_batch"][2]
    test.x[:] = 0  # fresh arrays: the cache is not modified
    assert load_dataset("cifar10", "test", data_dir=tmp_path, download=False).x.max() > 0
    with pytest.raises(ValueError, match="carve"):
        load_dataset("cifar10", "val", data_dir=tmp_path)


def test_cifar_md5_checked_before_unpickling(tmp_path, cifar_files, monkeypatch):
    folder = _write_folder(tmp_path, cifar_files)
    (folder / "test_batch").write_bytes(cifar_files["test_batch"][0] + b"x")

    def forbidden(*args, **kwargs):
        raise AssertionError("a file with a wrong md5 must not be unpickled")

    monkeypatch.setattr(_cifar, "unpickle_batch", forbidden)
    with pytest.raises(DataCorruptError) as info:
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "test_batch" in msg and _cifar.MD5["test_batch"] in msg and "\n" not in msg


def test_cifar_unpickler_refuses_globals(tmp_path, cifar_files, monkeypatch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = _write_folder(tmp_path, cifar_files)
    raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    (folder / "test_batch").write_bytes(raw)
    monkeypatch.setitem(_cifar.MD5, "test_batch", hashlib.md5(raw).hexdigest())
    with pytest.raises(DataCorruptError, match="refusing to load global"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, match",
    [
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 ints"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "out of range"),
        ([1, 2], "list"),
    ],
)
def test_cifar_bad_batch_contents(obj, match):
    with pytest.raises(DataCorruptError, match=match):
        _cifar.unpickle_batch(_py2_pickle(obj), "fake_batch")


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "cifar-10-python.tar.gz" in msg
    assert "MODLENS_DATA" in msg and "download=False" in msg and "\n" not in msg


def _archive(files, extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for name, (raw, _, _) in files.items():
            add(f"cifar-10-batches-py/{name}", raw)
        for entry in extra:  # after the real files, so a naive extraction would let them win
            add(*entry)
    return buf.getvalue()


def test_cifar_extracts_the_archive_safely(tmp_path, cifar_files, monkeypatch):
    evil = [("../escaped.txt", b"no"), ("/tmp/absolute-modlens-test", b"no"),
            ("cifar-10-batches-py/readme.html", b"ignored"),
            ("cifar-10-batches-py/data_batch_1", b"", tarfile.SYMTYPE, "/etc/passwd")]
    blob = _archive(cifar_files, evil)
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setattr(_cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    d = load_dataset("cifar10", "train", data_dir=root, download=False)
    assert len(d) == 11
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar_files)
    assert not (folder / "data_batch_1").is_symlink()
    assert not (tmp_path / "escaped.txt").exists() and not os.path.exists("/tmp/absolute-modlens-test")


def test_cifar_archive_without_the_split(tmp_path, cifar_files, monkeypatch):
    blob = _archive({"test_batch": cifar_files["test_batch"]})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setattr(_cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path, download=False)) == 4
    with pytest.raises(DataCorruptError, match="does not contain cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


def test_cifar_download_checks_the_archive_md5(tmp_path, cifar_files, monkeypatch):
    blob = _archive(cifar_files)

    class Response(io.BytesIO):
        def __exit__(self, *exc):
            self.close()

    urls = []

    def serve(request, timeout=None):
        urls.append(request.full_url)
        return Response(blob)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(DataUnavailableError, match="md5"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "a")
    assert urls == [_cifar.URL] and not any((tmp_path / "a").rglob("*.tar.gz"))
    monkeypatch.setattr(_cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    d = load_dataset("cifar10", "test", data_dir=tmp_path / "b")
    assert d.y.tolist() == cifar_files["test_batch"][2]
    assert (tmp_path / "b" / "cifar-10-python.tar.gz").is_file()


def test_cifar_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataCorruptError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- ImageNet folder

WNIDS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture
def imagenet(tmp_path):
    """3 classes x 4 images of different sizes, modes and formats, plus files to ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for k, wnid in enumerate(WNIDS):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            w, h = (30 + 7 * i, 24 + 5 * k)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            if i == 1:
                img.convert("L").save(folder / f"ILSVRC2012_val_{k}{i}.png")
            elif i == 2:
                img.convert("RGBA").save(folder / f"ILSVRC2012_val_{k}{i}.PNG")
            else:
                img.save(folder / f"ILSVRC2012_val_{k}{i}.JPEG", quality=90)
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.JPEG").write_bytes(b"ignored")
    return root


def test_imagenet_load_and_batches(imagenet):
    d = load_imagenet_folder(imagenet, size=16, resize=20)
    assert d.x.shape == (12, 3, 16, 16) and d.x.dtype == np.float32 and d.n_classes == 3
    assert d.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and d.split == "val"
    batches = list(iter_imagenet_folder(imagenet, batch_size=5, size=16, resize=20))
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), d.x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), d.y)


def test_imagenet_preprocessing(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high: no resize at resize=20
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    raw = preprocess_image(tmp_path / "a.png", size=16, resize=20, normalize=False)
    assert raw.shape == (3, 16, 16)  # centre crop: columns 12..27, the colour edge in the middle
    np.testing.assert_array_equal(raw[0, :, :8], 1.0)
    np.testing.assert_array_equal(raw[2, :, 8:], 1.0)
    np.testing.assert_array_equal(raw[0, :, 8:], 0.0)
    norm = preprocess_image(tmp_path / "a.png", size=16, resize=20)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(norm, (raw - mean[:, None, None]) / std[:, None, None], rtol=1e-6)
    Image.fromarray(np.full((50, 30), 128, np.uint8)).save(tmp_path / "gray.png")  # grayscale, resized
    gray = preprocess_image(tmp_path / "gray.png", size=16, resize=20, normalize=False)
    assert gray.shape == (3, 16, 16)
    np.testing.assert_allclose(gray, 128 / 255, atol=1e-6)


def test_imagenet_per_class_subsample(imagenet, tmp_path):
    a = index_image_folder(imagenet, per_class=2, seed=1)
    assert len(a) == 6 and np.bincount(a.labels).tolist() == [2, 2, 2]
    assert a.paths == index_image_folder(imagenet, per_class=2, seed=1).paths
    others = [index_image_folder(imagenet, per_class=2, seed=s).paths for s in range(2, 8)]
    assert any(p != a.paths for p in others)
    # a class's subsample does not depend on the other folders
    os.rename(imagenet / WNIDS[0], tmp_path / "moved")
    b = index_image_folder(imagenet, per_class=2, seed=1, classes=list(WNIDS))
    assert b.paths == a.paths[2:] and b.labels.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"4 images, fewer than per_class=5"):
        index_image_folder(imagenet, per_class=5)


def test_imagenet_class_mappings(imagenet, tmp_path):
    text = tmp_path / "LOC_synset_mapping.txt"
    text.write_text("n00000001 something\n" + "".join(f"{w} name, other name\n" for w in reversed(WNIDS)))
    d = index_image_folder(imagenet, classes=text)
    assert d.classes[0] == "n00000001" and len(d.classes) == 4
    assert sorted(set(d.labels.tolist())) == [1, 2, 3] and d.labels[0] == 1  # n01484850 is line 1
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({str(i): [w, "name"] for i, w in enumerate(WNIDS[::-1])}))
    assert index_image_folder(imagenet, classes=keras).labels[0] == 0
    assert load_imagenet_folder(imagenet, classes=text, per_class=1, size=8, resize=8).n_classes == 4
    with pytest.raises(ValueError, match="n01440764"):
        index_image_folder(imagenet, classes=list(WNIDS[1:]))
    with pytest.raises(DataCorruptError, match="more than once"):
        index_image_folder(imagenet, classes=[WNIDS[0], WNIDS[0]])


def test_imagenet_errors(imagenet, tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_imagenet_folder(tmp_path / "nope")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataUnavailableError, match="sort them into one sub-folder per class"):
        load_imagenet_folder(flat)
    with pytest.raises(ValueError, match="resize"):
        load_imagenet_folder(imagenet, size=32, resize=16)
    bad = imagenet / WNIDS[1] / "ILSVRC2012_val_broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataCorruptError, match="ILSVRC2012_val_broken.JPEG"):
        load_imagenet_folder(imagenet, size=8, resize=8)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        iter_imagenet_folder(imagenet)
