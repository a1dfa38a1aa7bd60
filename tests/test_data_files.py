"""Test and activation data from files: image folders with a model's preprocessing or given
options, arrays in .npz/.safetensors files, dataset names; what identifies them in task keys."""

from __future__ import annotations

import numpy as np
import pytest

from modlens.data import data_files_identity, load_data_files, preprocess_image, read_arrays

from model_helpers import image_folder


def test_image_folder_with_size_mean_std_and_grayscale(tmp_path):
    folder = image_folder(tmp_path / "imgs", per_class=3, size=(20, 30))
    (x, y), act, record = load_data_files(folder, image_size=16, resize=18, mean=[0.5] * 3, std=[0.25] * 3)
    assert x.shape == (6, 3, 16, 16) and x.dtype == np.float32 and y.tolist() == [0, 0, 0, 1, 1, 1] and act is None
    raw = preprocess_image(folder / "cat" / "0.png", size=16, resize=18, normalize=False)
    assert np.allclose(x[0], (raw - 0.5) / 0.25, atol=1e-6)
    assert record["test"]["kind"] == "images" and record["test"]["n"] == 6 and record["test"]["n_classes"] == 2
    (g, _), _, _ = load_data_files(folder, image_size=8, channels=1, interpolation="bicubic")
    assert g.shape == (6, 1, 8, 8) and 0 <= g.min() and g.max() <= 1
    # as they are: every image must then have the same size
    (same, _), _, _ = load_data_files(folder)
    assert same.shape == (6, 3, 20, 30)
    image_folder(folder, classes=("cat",), per_class=1, size=(10, 10), seed=1)  # overwrites cat/0.png smaller
    with pytest.raises(ValueError, match="differ in size.*--image-size"):
        load_data_files(folder)


def test_one_folder_for_test_and_activation_is_split_per_class(tmp_path):
    folder = image_folder(tmp_path / "imgs", per_class=5)
    (x, y), act, record = load_data_files(folder, folder, per_class=2, activation_per_class=3, image_size=8)
    assert len(x) == 4 and y.tolist() == [0, 0, 1, 1] and len(act) == 6
    rows = lambda a: {v.tobytes() for v in a}  # noqa: E731
    assert not rows(x) & rows(act)
    assert record["test"]["part"] == "test" and record["activation"]["part"] == "activation"
    (x2, _), act2, _ = load_data_files(folder, folder, image_size=8)  # default: half (rounded up) each
    assert len(x2) == 6 and len(act2) == 4
    with pytest.raises(ValueError, match="too few"):
        load_data_files(folder, folder, per_class=5)


def test_arrays_and_dataset_names(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((5, 3)), y=np.arange(5))
    x, y = read_arrays(tmp_path / "d.npz")
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (5, 3)
    from safetensors.numpy import save_file

    save_file({"input_ids": np.arange(12, dtype=np.int32).reshape(4, 3), "labels": np.array([0, 1, 0, 1])},
              str(tmp_path / "t.safetensors"))
    ids, labels = read_arrays(tmp_path / "t.safetensors")
    assert ids.dtype == np.int64 and labels.tolist() == [0, 1, 0, 1]
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="name the inputs one of x, inputs"):
        read_arrays(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="has no labels"):
        load_data_files(tmp_path / "nolabels.npz")
    (x, y), act, record = load_data_files("digits", "digits")
    assert record["test"]["split"] == "test" and record["activation"]["split"] == "val" and len(act) != len(x)
    (_, _), train, _ = load_data_files("digits", "digits:train")
    assert len(train) > len(act)
    with pytest.raises(ValueError, match="neither a folder.*dataset name"):
        load_data_files("no-such-data")


def test_identity_names_files_not_paths(tmp_path):
    folder = image_folder(tmp_path / "a", per_class=2)
    before = data_files_identity(folder, folder, image_size=8)
    moved = folder.rename(tmp_path / "b")
    assert data_files_identity(moved, moved, image_size=8) == before
    assert data_files_identity(moved, moved, image_size=9) != before
    image_folder(moved, classes=("dog",), per_class=3, seed=2)  # one more image
    assert data_files_identity(moved, moved, image_size=8) != before
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    first = data_files_identity(tmp_path / "d.npz")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 2)), y=np.zeros(2, dtype=int))
    assert data_files_identity(tmp_path / "d.npz") != first
