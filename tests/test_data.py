"""Data sources on tiny data the tests make themselves."""
import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from prunetune.search.config import load_config
from prunetune.search.prepare import base_cache_path, data_kwargs, model_spec, prepare
from prunetune.workers import data as data_module
from prunetune.workers.data import DataError, heldout_split, iterate_batches, load_data
from prunetune.workers.settings import EvaluationSettings
from tests.bad_values import BAD_DATA


def test_digits_ships_with_sklearn():
    data = load_data("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.test) == 1797
    x, y = next(iterate_batches(data.train, range(16), 16))
    assert x.shape == (16, 1, 8, 8) and abs(float(data.train.get_batch(torch.arange(len(data.train)))[0].mean())) < 0.05
    a, _ = data.train_augmented.get_batch(torch.arange(64))
    b, _ = data.train.get_batch(torch.arange(64))
    assert a.shape == b.shape and not torch.equal(a, b)  # augmentation moves pixels


def test_digits_are_sklearns_read_without_importing_sklearn_datasets(monkeypatch):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for found in (True, False):  # the file scikit-learn ships; load_digits where it is not found
        if not found:
            monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
        images, labels = data_module.digits_arrays()
        assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)
        assert images.dtype == digits.images.dtype and labels.dtype == digits.target.dtype
    code = ("import sys\nfrom prunetune.workers.data import load_data\nload_data('digits')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sklearn', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


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


def test_an_image_folder_says_how_far_its_hashing_and_decoding_are_once_lines_are_due(tmp_path, monkeypatch, capsys):
    from prunetune.workers import progress

    root = str(tmp_path / "folder")
    _write_images(root, 16)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1e9)
    load_data("imagefolder", path=root, cache_dir=str(tmp_path / "quiet"))
    assert "data: " not in capsys.readouterr().err
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    load_data("imagefolder", path=root, cache_dir=str(tmp_path / "cache"))
    err = capsys.readouterr().err.splitlines()
    hashed = [line.split(" (")[0] for line in err if line.startswith("data: hashing image files: ")]
    one_split = [f"data: hashing image files: {k}/18" for k in range(1, 19)]
    one_split[-1] += " done in 0:00"
    assert hashed == 2 * one_split  # the training and the test images
    assert sum(line.startswith("data: decoding images: 18/18 done in 0:00 (") for line in err) == 2


def test_the_driver_decodes_the_same_arrays_and_errors_with_worker_processes(tmp_path):
    from prunetune.workers.evaluator import evaluation_data

    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    _write_images(small, 16)
    _write_images(large, 80, per_class=3)
    serial, parallel = (load_data("imagefolder", path=small, num_workers=w) for w in (0, 2))
    assert torch.equal(serial.train.images, parallel.train.images)
    assert torch.equal(serial.test.images, parallel.test.images)
    cfg = EvaluationSettings(heldout_size=4, batch_size=3, calibration_batches=2)
    data = load_data("imagefolder", path=large, image_size=72)
    serial, parallel = (evaluation_data(data, cfg, num_workers=w) for w in (0, 2))
    assert serial.calibration.shape == (6, 3, 72, 72) and serial.heldout_x.shape == (4, 3, 72, 72)
    for name in ("calibration", "heldout_x", "heldout_y"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    with open(os.path.join(small, "test", "dog", "3.png"), "wb") as f:
        f.write(b"not an image")
    errors = []
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            load_data("imagefolder", path=small, num_workers=workers)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[1] and errors[1].startswith("data.path: cannot read image")


def test_simplejpeg_decodes_the_pixels_pillow_does_and_refuses_a_truncated_jpeg(tmp_path, monkeypatch):
    if data_module.FAST_JPEG is None:
        pytest.skip("simplejpeg is not installed (the fast-decode extra)")
    root = str(tmp_path / "folder")
    _write_images(root, 40, per_class=4)
    fast = load_data("imagefolder", path=root, image_size=32)
    def called(blob: bytes, colorspace: str):
        raise LookupError(f"decoded {colorspace}")

    monkeypatch.setattr(data_module, "FAST_JPEG", called)
    with pytest.raises(LookupError, match="decoded RGB"):  # the JPEGs go through FAST_JPEG
        load_data("imagefolder", path=root, image_size=32)
    monkeypatch.setattr(data_module, "FAST_JPEG", None)
    pillow = load_data("imagefolder", path=root, image_size=32)
    assert torch.equal(fast.train.images, pillow.train.images) and torch.equal(fast.test.images, pillow.test.images)
    blob = open(os.path.join(root, "train", "cat", "0.jpg"), "rb").read()
    with open(os.path.join(root, "train", "cat", "0.jpg"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    monkeypatch.setattr(data_module, "FAST_JPEG", data_module._fast_jpeg())
    with pytest.raises(DataError, match=r"^data.path: cannot read image .*0.jpg \(Premature end of JPEG file\)$"):
        load_data("imagefolder", path=root, image_size=32)


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


@pytest.mark.parametrize("what, overrides, fragment", BAD_DATA)
def test_clear_errors(what, overrides, fragment):
    given = dict(o.split("=", 1) for o in overrides)
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_data(given["data.name"], path=given.get("data.path"))



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


def _two_classes(root, make, n=3):
    """An imagefolder root/train/{a,b}/i.png of `make(class_index, i)` images, and one test image per class."""
    for split, count in (("train", n), ("test", 1)):
        for c, cls in enumerate("ab"):
            os.makedirs(root / split / cls)
            for i in range(count):
                make(c, i).save(root / split / cls / f"{i}.png")


def test_16_bit_and_palette_images_decode_to_their_8_bit_values(tmp_path):
    grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0..63000: Pillow's own convert gives 255 from 256
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = bytes([0] * 256)  # transparency as bytes: Pillow warns on convert("RGB")
    modes = [Image.fromarray(grey16), palette, Image.new("LA", (8, 8), (77, 9)),
             Image.new("RGBA", (8, 8), (1, 2, 3, 0))]
    _two_classes(tmp_path / "f", lambda c, i: modes[(2 * c + i) % 4], n=2)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "f" / "train" / "b" / "9.jpg")  # red
    assert Image.open(tmp_path / "f" / "train" / "a" / "0.png").mode == "I;16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_data("imagefolder", path=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"))
    images = data.train.images.permute(0, 2, 3, 1).numpy()  # a/0 grey16, a/1 palette, b/0 LA, b/1 RGBA, b/9 CMYK
    assert np.array_equal(images[0, ..., 0], np.rint(grey16 / 257))
    assert np.array_equal(images[0, ..., 0], images[0, ..., 1]) and np.array_equal(images[0, ..., 0], images[0, ..., 2])
    assert (images[1] == [200, 100, 50]).all() and (images[2] == 77).all() and (images[3] == [1, 2, 3]).all()
    assert np.abs(images[4].astype(int) - [255, 0, 0]).max() < 8  # JPEG is lossy


def test_the_decoded_image_cache_follows_the_files_content_not_their_names(tmp_path, monkeypatch):
    root, cache = tmp_path / "f", str(tmp_path / "cache")
    _two_classes(root, lambda c, i: Image.new("RGB", (8, 8), (40 * c + i, 5, 6)))
    first = load_data("imagefolder", path=str(root), cache_dir=cache)
    changed, before = root / "train" / "b" / "2.png", os.stat(root / "train" / "b" / "2.png")
    Image.new("RGB", (8, 8), (99, 5, 6)).save(changed)  # changed in place: same name, size and time
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(changed) == before.st_size
    second = load_data("imagefolder", path=str(root), cache_dir=cache)
    assert int(first.train.images[-1, 0, 0, 0]) == 42 and int(second.train.images[-1, 0, 0, 0]) == 99
    assert second.notes == [] and first.fingerprint != second.fingerprint
    assert torch.isfinite(second.train.get_batch(torch.arange(6))[0]).all()  # green and blue are constant: std 1
    monkeypatch.setattr(data_module, "HASHED_BYTES", 0)  # files too large to hash: keyed by size and time alone
    Image.new("RGB", (8, 8), (77, 5, 6)).save(changed)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert int(load_data("imagefolder", path=str(root), cache_dir=cache).train.images[-1, 0, 0, 0]) == 77
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={root}", f"output.cache_dir={cache}"])
    spec = model_spec(cfg, 2, 3)
    assert base_cache_path(cfg, spec, first.fingerprint) != base_cache_path(cfg, spec, second.fingerprint)


def test_a_cached_entry_that_fails_its_check_is_decoded_again_with_one_line(tmp_path):
    root, cache = tmp_path / "f", tmp_path / "cache"
    _two_classes(root, lambda c, i: Image.new("RGB", (8, 8), (40 * c + i, 5, 6)))
    first = load_data("imagefolder", path=str(root), cache_dir=str(cache))
    train_entry = max(cache.iterdir(), key=lambda p: p.stat().st_size)  # 6 images; the test split has 2
    damaged = bytearray(train_entry.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 200] = bytes(200)
    train_entry.write_bytes(bytes(damaged))
    second = load_data("imagefolder", path=str(root), cache_dir=str(cache))
    assert torch.equal(second.train.images, first.train.images)
    assert len(second.notes) == 1
    assert second.notes[0].startswith(
        f"output.cache_dir: the decoded images cached in {train_entry} failed their check")
    assert load_data("imagefolder", path=str(root), cache_dir=str(cache)).notes == []  # rebuilt


def test_constant_training_images_are_refused(tmp_path):
    _two_classes(tmp_path / "f", lambda c, i: Image.new("RGB", (8, 8), (255, 255, 255)))
    with pytest.raises(DataError, match="are all one colour \\(std 0\\)"):
        load_data("imagefolder", path=str(tmp_path / "f"))


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = tmp_path / "f"
    _write_images(str(root), 8, per_class=2)
    (root / "train" / "fox").mkdir()
    with pytest.raises(DataError, match=f"data.path: class folder {root / 'train' / 'fox'} has no images"):
        load_data("imagefolder", path=str(root))


def test_a_symlink_loop_among_the_classes_is_refused_and_does_not_hang(tmp_path):
    root = tmp_path / "f"
    _write_images(str(root), 8, per_class=2)
    os.symlink(root / "train" / "loop", root / "train" / "loop")  # a link to itself
    with pytest.raises(DataError, match=f"data.path: {root / 'train' / 'loop'} is a symlink that cannot be followed"):
        load_data("imagefolder", path=str(root))
    os.remove(root / "train" / "loop")
    os.symlink(root / "train", root / "train" / "up")  # a cycle: the class folder holds the class folders
    with pytest.raises(DataError, match=f"data.path: class folder {root / 'train' / 'up'} has no images"):
        load_data("imagefolder", path=str(root))


def test_an_image_over_the_pixel_limit_is_refused_in_one_line_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    root = tmp_path / "f"
    _write_images(str(root), 16, per_class=2)  # 256 pixels each
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={root}", "data.max_image_pixels=255"])
    with pytest.raises(DataError, match="has 16 x 16 = 256 pixels, over the limit of 255 .*set data.max_image_pixels "
                                        "to 256 or more"):
        load_data(**data_kwargs(cfg))
    large = tmp_path / "large"
    _write_images(str(large), 80, per_class=1)  # over 64 px: decoded per item as batches are read
    Image.new("RGB", (90, 90)).save(large / "test" / "emu" / "0.jpg")
    data = load_data("imagefolder", path=str(large), max_image_pixels=80 * 80)
    assert data.test[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError, match=f"image {large / 'test' / 'emu' / '0.jpg'} has 90 x 90 = 8,100 pixels, over "
                                        "the limit of 6,400 "):
        data.test[2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own limit: it refuses at twice this
    with pytest.raises(DataError, match="over the limit of 200 "):
        load_data("imagefolder", path=str(root))
    assert len(load_data("imagefolder", path=str(root), max_image_pixels=256).train) == 6
    assert Image.MAX_IMAGE_PIXELS == 100


def test_a_training_set_too_small_for_the_held_out_split_says_so(tmp_path):
    _two_classes(tmp_path / "f", lambda c, i: Image.new("RGB", (8, 8), (40 * c + i, i, 6)), n=1)
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={tmp_path / 'f'}", f"output.dir={tmp_path / 'run'}",
                             f"output.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match="evaluation.heldout_size: the training set has only 2 images, too few to hold "
                                        "out 300 and keep 128 for calibration and fine-tuning; it needs 428 \\(at the "
                                        "least 129, with evaluation.heldout_size=1\\)"):
        prepare(cfg)


def test_an_image_folders_normalisation_is_the_whole_folders_though_its_files_are_sorted_by_class(tmp_path,
                                                                                                   monkeypatch):
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]  # class a red, b green, c blue: file order is by class
    for c, cls in enumerate("abc"):
        for split, count in (("train", 20), ("test", 1)):
            os.makedirs(tmp_path / "f" / split / cls, exist_ok=True)
            for i in range(count):
                colour = tuple(v + 4 * (i % 2) for v in colours[c])
                Image.new("RGB", (8, 8), colour).save(tmp_path / "f" / split / cls / f"{i}.png")
    monkeypatch.setattr(data_module, "NORMALISATION_SAMPLE", 30)  # half the folder, as 10,000 of CIFAR-10's 50,000
    data = load_data("imagefolder", path=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"))
    everything = data.train.images.float() / 255
    mean, std = everything.mean(dim=(0, 2, 3)), everything.std(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(data.contract.mean), mean, rtol=0.01)
    assert torch.allclose(torch.tensor(data.contract.std), std, rtol=0.01)
    first = everything[:30].mean(dim=(0, 2, 3))  # the first images in file order: reds and greens, no blue
    assert not torch.allclose(first, mean, rtol=0.01)
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={tmp_path / 'f'}"])
    monkeypatch.setattr(data_module, "NORMALISATION", "another way")  # a base model cached with it is not reused
    other = load_data("imagefolder", path=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"))
    spec = model_spec(cfg, 3, 3)
    assert base_cache_path(cfg, spec, data.fingerprint) != base_cache_path(cfg, spec, other.fingerprint)
