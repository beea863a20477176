"""Data sources on tiny data the tests make themselves."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from prunetune.workers.data import DataError, heldout_split, iterate_batches, load_data


def test_digits_ships_with_sklearn():
    data = load_data("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.test) == 1797
    x, y = next(iterate_batches(data.train, range(16), 16))
    assert x.shape == (16, 1, 8, 8) and abs(float(data.train.get_batch(torch.arange(len(data.train)))[0].mean())) < 0.05
    a, _ = data.train_augmented.get_batch(torch.arange(64))
    b, _ = data.train.get_batch(torch.arange(64))
    assert a.shape == b.shape and not torch.equal(a, b)  # augmentation moves pixels


def test_heldout_split_is_seeded_and_disjoint():
    h1, rest1 = heldout_split(1000, 100, seed=0)
    h2, rest2 = heldout_split(1000, 100, seed=0)
    assert np.array_equal(h1, h2) and np.array_equal(rest1, rest2)
    assert not set(h1) & set(rest1) and len(set(h1) | set(rest1)) == 1000
    assert not np.array_equal(h1, heldout_split(1000, 100, seed=1)[0])
    with pytest.raises(DataError, match="evaluation.heldout_size: must be in \\[1, 99\\]"):
        heldout_split(100, 100, 0)


def _write_cifar(root, n=20):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": b"x"}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_cifar10_batches_without_torchvision(tmp_path):
    root = str(tmp_path / "cifar-10-batches-py")
    _write_cifar(root)
    data = load_data("cifar10", path=root)
    assert len(data.train) == 100 and len(data.test) == 20 and data.input_shape == (3, 32, 32)
    x, y = data.train[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_pickled_code(tmp_path):
    root = str(tmp_path / "cifar")
    _write_cifar(root)
    with open(os.path.join(root, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refused global"):
        load_data("cifar10", path=root)


def _write_images(root, size, per_class=6):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "emu"):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr).save(os.path.join(root, split, cls, f"{i}.{ext}"))


def test_imagefolder_small_images_decode_once_and_cache(tmp_path):
    root = str(tmp_path / "folder")
    _write_images(root, 16)
    cache = str(tmp_path / "cache")
    data = load_data("imagefolder", path=root, cache_dir=cache)
    assert data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert len(data.train) == 18 and len(data.test) == 18
    assert len(os.listdir(cache)) == 2  # train and test arrays
    again = load_data("imagefolder", path=root, cache_dir=cache)
    assert torch.equal(again.train.images, data.train.images)


def test_imagefolder_large_images_resize_and_crop(tmp_path):
    root = str(tmp_path / "big")
    _write_images(root, 90, per_class=2)
    data = load_data("imagefolder", path=root, image_size=72)
    x, y = data.test[0]
    assert x.shape == (3, 72, 72)
    xa, _ = data.train_augmented[0]
    assert xa.shape == (3, 72, 72)


def test_synthetic_is_deterministic():
    data = load_data("synthetic", image_size=12, num_classes=5, train_size=30, test_size=7, seed=3)
    assert data.input_shape == (3, 12, 12) and len(data.train) == 30 and len(data.test) == 7
    assert torch.equal(data.train[4][0], load_data("synthetic", image_size=12, num_classes=5, seed=3).train[4][0])


def test_factory():
    data = load_data("tests.data_factory:make", kwargs={"n": 30})
    assert data.num_classes == 3 and len(data.train) == 30 and data.input_shape == (1, 8, 8)


@pytest.mark.parametrize("name, path, fragment", [
    ("cifar10", "/nonexistent/cifar", "data.path: directory not found"),
    ("imagefolder", None, "data.path: this data set needs a path"),
    ("synthetic", None, "data.num_classes"),
    ("nosuch.module:make", None, "data.name: cannot import module"),
    ("mnist", None, "data.name: unknown data set 'mnist'"),
])
def test_clear_errors(name, path, fragment):
    with pytest.raises(DataError, match=fragment):
        load_data(name, path=path)


def test_empty_imagefolder(tmp_path):
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(DataError, match="no images found"):
        load_data("imagefolder", path=str(tmp_path / "empty"))


def test_a_test_class_without_training_images_is_left_out_and_said(tmp_path):
    root = tmp_path / "folder"
    _write_images(str(root), 16)
    (root / "test" / "zebra").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "zebra" / "0.png")
    data = load_data("imagefolder", path=str(root))
    assert data.num_classes == 3 and len(data.test) == 18
    assert data.notes == [f"data.path: test class zebra of {root / 'test'} has no training images and is left out"]
