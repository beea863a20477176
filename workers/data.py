"""Data sources (digits, cifar10, imagefolder, synthetic, yolo: workers/yolo_data.py, factory), the held-out split,
and batching."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import BadInput
from .files import atomic_write
from .messages import shown
from .progress import Progress
from .seeds import generator

SOURCES = ("digits", "cifar10", "imagefolder", "synthetic", "yolo")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DECODER_VERSION = 2  # in the decoded-image cache key: a change in how files decode makes a new cache entry
# Up to this total, the files' bytes join the decoded-image cache key (reading and hashing CIFAR-10's 60,000 PNGs,
# 55 MB, costs about a tenth of decoding them; every process that loads the data pays it)
HASHED_BYTES = 256 * 2**20
# An image folder's mean and std come from this many training images, each class in its share of the set, drawn with
# a fixed seed (the first ones in file order would be the first classes only). NORMALISATION names the way: it is in
# the data's fingerprint, so a base model cached with another normalisation is never reused.
NORMALISATION_SAMPLE = 10_000
NORMALISATION = "stratified-seeded-v1"


def _fast_jpeg():
    """simplejpeg's JPEG decoder when it is installed (the `fast-decode` extra: libjpeg-turbo, the same pixels as
    Pillow's, about twice as fast), else None: Pillow decodes."""
    try:
        from simplejpeg import decode_jpeg
    except ImportError:
        return None
    return decode_jpeg


FAST_JPEG = _fast_jpeg()


class DataError(BadInput, ValueError):
    """A data source that cannot be read, with the config field to blame."""


class TensorImages(Dataset):
    """Images held in memory as uint8 [N, C, H, W]; normalised (and optionally augmented) per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, scale: float = 1 / 255,
                 pad: int = 0, flip: bool = False, augment: bool = False):
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale, self.pad, self.flip, self.augment = scale, pad, flip, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])

    def augmented(self) -> "TensorImages":
        """The same samples with training augmentation (random crop after padding, optional flip)."""
        return TensorImages(self.images, self.labels, self.mean.flatten().tolist(), self.std.flatten().tolist(),
                            self.scale, self.pad, self.flip, augment=True)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float batch for the given indices."""
        x = self.images[idx].float() * self.scale
        if self.augment:
            x = _random_crop_flip(x, self.pad, self.flip)
        return (x - self.mean) / self.std, self.labels[idx]


def _random_crop_flip(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    n, _, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,))
        dx = torch.randint(0, 2 * pad + 1, (n,))
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    if flip:
        mask = torch.rand(n) < 0.5
        x[mask] = x[mask].flip(-1)
    return x


class LazyImageFolder(Dataset):
    """Large images decoded per item (`_open_image`): resize + centre crop for eval, random-resized crop for
    training."""

    def __init__(self, files: list[str], labels: list[int], size: int, augment: bool = False,
                 max_pixels: int | None = None):
        self.files, self.labels, self.size, self.augment, self.max_pixels = files, labels, size, augment, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def augmented(self) -> "LazyImageFolder":
        """The same samples with random-resized-crop and flip."""
        return LazyImageFolder(self.files, self.labels, self.size, True, self.max_pixels)

    def __getitem__(self, i: int):
        with _open_image(self.files[i], self.max_pixels) as im:
            im = _rgb(im)
            im = _random_resized_crop(im, self.size) if self.augment else _center_crop(im, self.size)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - mean) / std, self.labels[i]


def _center_crop(im, size: int):
    from PIL import Image

    short = int(round(size / 0.875))
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _random_resized_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    for _ in range(10):
        area = w * h * float(torch.empty(()).uniform_(0.08, 1.0))
        logr = torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3))
        ratio = float(torch.exp(logr))
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, ()))
            top = int(torch.randint(0, h - ch + 1, ()))
            return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return _center_crop(im, size)


class SyntheticImages(Dataset):
    """Random images and labels, generated per index from a seed (throughput work; nothing to learn)."""

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, seed: int):
        self.n, self.shape, self.num_classes, self.seed = n, tuple(shape), num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = generator(self.seed, int(i))
        return torch.randn(self.shape, generator=g), int(torch.randint(0, self.num_classes, (), generator=g))

    def augmented(self) -> "SyntheticImages":
        """Synthetic data has no augmentation."""
        return self

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of the given indices."""
        items = [self[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@dataclass(frozen=True)
class InputContract:
    """What a model trained on this data takes: a float batch [N, *shape] of raw pixel values (0..255, or 0..16
    for digits), times `scale`, minus `mean`, divided by `std`, per channel; `resize` says how images of another
    size are brought to `shape` (None: they must have it). `classes` names the output columns."""

    shape: tuple[int, int, int]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    resize: str | None = None

    def to_dict(self) -> dict:
        """JSON-safe form, as model records and export metadata carry it."""
        return {"shape": list(self.shape), "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                "classes": list(self.classes), "resize": self.resize}


class Preprocess(nn.Module):
    """The input contract as a layer: raw pixel values in, normalised input out (exported models start with it)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, contract: dict):
        super().__init__()
        channels = len(contract["mean"])
        self.scale = float(contract["scale"])
        self.register_buffer("mean", torch.tensor(contract["mean"], dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(contract["std"], dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.scale - self.mean) / self.std


class ImageDataset(Protocol):
    """A map-style data set as prunetune reads it: item i, an (image, target) pair, and the number of items (torch's
    Dataset declares no length). TensorImages and LazyImageFolder are; a data factory's data sets must be."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    """A data set as the workers use it: eval-preprocessed train and test splits plus an augmented train view."""

    train: ImageDataset
    test: ImageDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    train_augmented: ImageDataset
    contract: InputContract | None = None  # None: a factory's data, whose preprocessing prunetune does not know
    notes: list[str] = field(default_factory=list)  # what the loader noticed and the user should hear about
    fingerprint: str | None = None  # digest of the content (images, labels) where known: keys the base-model cache

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero batch of the input shape (for tracing and FLOPs counting)."""
        return torch.zeros(batch, *self.input_shape)


def load_data(name: str, path: str | None = None, image_size: int | None = None, num_classes: int | None = None,
              train_size: int = 2048, test_size: int = 512, seed: int = 0, cache_dir: str | None = None,
              kwargs: dict | None = None, max_image_pixels: int | None = None, num_workers: int = 0) -> DataBundle:
    """Load a data source by name (or `package.module:function`) into a DataBundle; an image file of more than
    `max_image_pixels` pixels is refused (None: Pillow's limit); small images are decoded into memory by
    `num_workers` processes (0: this one)."""
    if ":" in name:
        return _from_factory(name, kwargs or {})
    if name == "digits":
        return _digits()
    if name == "cifar10":
        return _cifar10(_existing_dir(path, "data.path"))
    if name == "imagefolder":
        return _imagefolder(_existing_dir(path, "data.path"), image_size, cache_dir, max_image_pixels, num_workers)
    if name == "yolo":
        from .yolo_data import load_yolo  # it builds on this module

        return load_yolo(path or "", image_size, max_image_pixels)
    if name == "synthetic":
        if not num_classes or num_classes < 2:
            raise DataError("data.num_classes: synthetic data needs num_classes >= 2")
        size = image_size or 32
        shape = (3, size, size)
        return DataBundle(SyntheticImages(train_size, shape, num_classes, seed),
                          SyntheticImages(test_size, shape, num_classes, seed + 1), num_classes, shape,
                          SyntheticImages(train_size, shape, num_classes, seed),
                          InputContract(shape, 1.0, (0.0,) * 3, (1.0,) * 3, tuple(map(str, range(num_classes)))))
    raise DataError(f"data.name: unknown data set '{name}'; allowed: {', '.join(SOURCES)} or package.module:function")


def _existing_dir(path: str | None, field: str) -> str:
    if not path:
        raise DataError(f"{field}: this data set needs a path")
    if not os.path.isdir(path):
        raise DataError(f"{field}: directory not found: {path}")
    return path


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as load_digits gives them, images (1797, 8, 8) and labels, read from the file it ships
    without importing sklearn.datasets (which imports SciPy: about a second in every process that loads digits);
    load_digits itself where that file is not where scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin \
        else ""
    if not os.path.isfile(path):
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _digits() -> DataBundle:
    pixels, target = digits_arrays()
    images = torch.from_numpy(pixels.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    n_test = len(labels) // 5
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    scaled = images[train_idx].float() / 16
    mean, std = [float(scaled.mean())], [float(scaled.std())]
    train = TensorImages(images[train_idx], labels[train_idx], mean, std, scale=1 / 16, pad=1)
    test = TensorImages(images[test_idx], labels[test_idx], mean, std, scale=1 / 16)
    return DataBundle(train, test, 10, (1, 8, 8), train.augmented(),
                      InputContract((1, 8, 8), 1 / 16, tuple(mean), tuple(std), tuple(map(str, range(10)))))


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for the CIFAR batch files that refuses anything but numpy arrays (no code execution)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise DataError(f"data.path: {path} is not a CIFAR-10 batch file ({e})") from None
    return data, labels


def _cifar10(root: str) -> DataBundle:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise DataError(f"data.path: {root} is not a cifar-10-batches-py directory (missing {', '.join(missing)})")
    parts = [_read_cifar_batch(os.path.join(root, n)) for n in names]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train = TensorImages(train_x, train_y, mean, std, pad=4, flip=True)
    test = TensorImages(torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1]), mean, std)
    return DataBundle(train, test, 10, (3, 32, 32), train.augmented(),
                      InputContract((3, 32, 32), 1 / 255, mean, std, CIFAR10_CLASSES))


def _class_folders(root: str) -> list[str]:
    """The sub-directories of `root`, sorted; a symlink there that cannot be followed (a loop, a missing target)
    is refused rather than silently not being a class."""
    classes = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.islink(path):
            try:
                os.stat(path)
            except OSError as e:
                raise DataError(f"data.path: {path} is a symlink that cannot be followed ({e.strerror or e}); "
                                "fix or remove it") from None
        if os.path.isdir(path):
            classes.append(name)
    return classes


def _list_images(root: str, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """The image files of a split and their labels, one class per folder. A class folder without images (empty,
    or a symlink to a folder of folders) is refused, naming it, unless no folder has any (the caller says so)."""
    classes = classes or _class_folders(root)
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            continue
        names = [name for name in sorted(os.listdir(folder)) if name.lower().endswith(IMAGE_SUFFIXES)]
        empty += [] if names else [folder]
        files += [os.path.join(folder, name) for name in names]
        labels += [label] * len(names)
    if empty and files:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"data.path: class folder {empty[0]}{more} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                        "add images or remove the folder")
    return files, labels, classes


def _imagefolder(root: str, image_size: int | None, cache_dir: str | None, max_pixels: int | None,
                 num_workers: int) -> DataBundle:
    train_root = os.path.join(root, "train")
    test_root = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(train_root):
        train_root = root
    files, labels, classes = _list_images(train_root)
    if len(classes) < 2 or not files:
        raise DataError(f"data.path: no images found in {train_root} (expected <class>/*.jpg|png, two classes or more)")
    notes = []
    if test_root:
        test_files, test_labels, _ = _list_images(test_root, classes)
        extra = sorted(set(_class_folders(test_root)) - set(classes))
        if extra:
            notes.append(f"data.path: test class{'es' if len(extra) > 1 else ''} {', '.join(extra)} of {test_root} "
                         f"{'have' if len(extra) > 1 else 'has'} no training images and "
                         f"{'are' if len(extra) > 1 else 'is'} left out")
    else:  # no test split on disk: hold out a seeded 10%
        perm = np.random.default_rng(0).permutation(len(files))
        cut = max(1, len(files) // 10)
        test_files, test_labels = [files[i] for i in perm[:cut]], [labels[i] for i in perm[:cut]]
        files, labels = [files[i] for i in perm[cut:]], [labels[i] for i in perm[cut:]]
    if not test_files:
        raise DataError(f"data.path: no test images in {test_root}")
    with _open_image(files[0], max_pixels) as im:
        native = min(im.size)
    size = image_size or (native if native <= 64 else 224)
    if size > 64:
        shape = (3, size, size)
        lazy = LazyImageFolder(files, labels, size, max_pixels=max_pixels)
        contract = InputContract(shape, 1 / 255, IMAGENET_MEAN, IMAGENET_STD, tuple(classes),
                                 f"shorter side to {round(size / 0.875)} px (bilinear), then a centre crop of "
                                 f"{size} px")
        return DataBundle(lazy, LazyImageFolder(test_files, test_labels, size, max_pixels=max_pixels),
                          len(classes), shape, lazy.augmented(), contract, notes)
    (train_x, test_x), keys = _decode_small([files, test_files], size, cache_dir, max_pixels, notes,
                                            num_workers)
    scaled = train_x[torch.from_numpy(normalisation_sample(labels, NORMALISATION_SAMPLE))].float() / 255
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).tolist()
    if max(std) == 0:
        raise DataError(f"data.path: the training images in {train_root} are all one colour (std 0): nothing to "
                        "learn, and normalising would divide by zero; check that they open as expected")
    std = [s or 1.0 for s in std]  # a constant channel is normalised to 0, not to NaN
    train = TensorImages(train_x, torch.tensor(labels), mean, std, pad=size // 8, flip=True)
    test = TensorImages(test_x, torch.tensor(test_labels), mean, std)
    contract = InputContract((3, size, size), 1 / 255, tuple(mean), tuple(std), tuple(classes),
                             f"a centre crop of {size} px (a bilinear resize if smaller)")
    fingerprint = hashlib.sha256(repr((keys, labels, test_labels, classes, NORMALISATION)).encode()).hexdigest() \
        if cache_dir else None
    return DataBundle(train, test, len(classes), (3, size, size), train.augmented(), contract, notes, fingerprint)


def normalisation_sample(labels: Sequence[int], size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `size` images (all of them when fewer): each class in its share of the set (largest
    remainders rounded up), drawn within the class with `seed`."""
    if len(labels) <= size:
        return np.arange(len(labels))
    of = np.asarray(labels)
    classes, counts = np.unique(of, return_counts=True)
    quota = counts * size / len(of)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[:size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(of == c), k, replace=False)
                                   for c, k in zip(classes, take)]))


def _open_image(path: str, max_pixels: int | None = None):
    """Pillow's image of a file, decoded (an RGB JPEG by FAST_JPEG where installed), or a DataError naming the
    file: one that cannot be read, or one of more than `max_pixels` pixels (None: the size at which Pillow itself
    refuses, twice Image.MAX_IMAGE_PIXELS)."""
    from PIL import Image, UnidentifiedImageError

    def unreadable(e: Exception) -> DataError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return DataError(f"data.path: cannot read image {path} ({reason})")

    pillow_limit = Image.MAX_IMAGE_PIXELS
    limit = max_pixels or (2 * pillow_limit if pillow_limit else None)
    Image.MAX_IMAGE_PIXELS = None  # checked below, in one line (Pillow's own check raises or warns)
    try:
        im = Image.open(path)  # reads the header only
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise unreadable(e) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = im.size
    if limit and width * height > limit:
        im.close()
        raise DataError(f"data.path: image {path} has {width} x {height} = {width * height:,} pixels, over the limit "
                        f"of {limit:,} (a guard against decompression bombs); if you trust this data, set "
                        f"data.max_image_pixels to {width * height} or more")
    if FAST_JPEG is not None and im.format == "JPEG" and im.mode == "RGB":
        try:
            with open(path, "rb") as f:
                return Image.fromarray(FAST_JPEG(f.read(), colorspace="RGB"))
        except (OSError, ValueError) as e:
            raise unreadable(e) from None
        finally:
            im.close()
    try:
        im.load()
    except (OSError, ValueError) as e:
        im.close()
        raise unreadable(e) from None
    return im


def _rgb(im):
    """An image as 8-bit RGB, as imagefolder data always is: 16-bit grey scaled to 8 bits (Pillow's own
    conversion clips it at 255), palette images through RGBA (no warning about their transparency), other modes
    (grey, grey + alpha, RGBA, CMYK) by Pillow; alpha is dropped, as torchvision's image loader does."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # PNG's 16-bit grey: 0..65535
        eight_bit = np.rint(np.asarray(im, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(eight_bit, "L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def _content_key(files: list[str], size: int) -> str:
    """Digest of what decoding `files` to `size` px yields: the decoder version, the size, each file's path, size
    and modification time, and its bytes too while the files total HASHED_BYTES or less (so a file changed in
    place, or a cache from another decoder, is never reused)."""
    digest = hashlib.sha256(f"{DECODER_VERSION}|{size}".encode())
    try:
        stats = [os.stat(path) for path in files]
        digest.update("".join(f"{p}|{st.st_size}|{st.st_mtime_ns}\n" for p, st in zip(files, stats)).encode())
        if sum(st.st_size for st in stats) <= HASHED_BYTES:
            progress = Progress("data: hashing image files", len(files))
            for path in files:
                with open(path, "rb") as f:
                    digest.update(f.read())
                progress.advance()
            progress.done()
    except OSError as e:
        raise DataError(f"data.path: cannot read image {e.filename} ({e.strerror or e})") from None
    return digest.hexdigest()


def _cached_images(path: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """The decoded images cached at `path` if they pass their check (shape, SHA-256 of the pixels), else None
    and why they failed (None if there is no such file)."""
    if not os.path.isfile(path):
        return None, None
    try:
        with np.load(path, allow_pickle=False) as saved:
            images, checksum = saved["images"], str(saved["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if images.shape != shape or images.dtype != np.uint8:
        return None, f"{images.dtype} {tuple(images.shape)}, expected uint8 {shape}"
    if hashlib.sha256(np.ascontiguousarray(images).data).hexdigest() != checksum:
        return None, "checksum mismatch"
    return images, None


class _SmallImages(Dataset):
    """Image files decoded to uint8 [3, size, size] (a centre crop, or a bilinear resize if smaller), each with
    its index: what _decode_small stores, read by `num_workers` processes."""

    def __init__(self, files: list[str], size: int, max_pixels: int | None):
        self.files, self.size, self.max_pixels = files, size, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        size = self.size
        with _open_image(self.files[i], self.max_pixels) as im:
            im = _rgb(im)
            if im.size != (size, size):
                im = _center_crop(im, size) if min(im.size) > size else \
                    im.resize((size, size), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()), i


def _decode_small(file_lists: list[list[str]], size: int, cache_dir: str | None, max_pixels: int | None,
                  notes: list[str], num_workers: int = 0) -> tuple[list[torch.Tensor], list[str | None]]:
    """Decode small images once into uint8 [N, 3, size, size] per list (by `num_workers` processes; 0: this one),
    and each list's content key (None without a cache). Cached in `cache_dir` by content, with a checksum; an
    entry that fails its check is decoded again (said in `notes`). Written only once every list has decoded (a
    bad image leaves no cache behind)."""
    arrays, keys, to_write = [], [], []
    for files in file_lists:
        shape = (len(files), 3, size, size)
        key = _content_key(files, size) if cache_dir else None
        cache = os.path.join(cache_dir, f"imagefolder-{key[:16]}.npz") if cache_dir and key else None
        arr, failed = _cached_images(cache, shape) if cache else (None, None)
        if failed:
            notes.append(f"output.cache_dir: the decoded images cached in {cache} failed their check ({failed}); "
                         "decoding the images again")
        if arr is None:
            arr = np.empty(shape, dtype=np.uint8)
            reader = BatchReader(_SmallImages(files, size, max_pixels), 64, num_workers, persistent=False)
            progress = Progress("data: decoding images", len(files))
            for x, idx in reader(range(len(files))):
                arr[idx.numpy()] = x.numpy()
                progress.advance(len(idx))
            progress.done()
            if cache:
                to_write.append((cache, arr))
        arrays.append(arr)
        keys.append(key)
    for cache, arr in to_write:
        def save(tmp: str, arr=arr) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, images=arr, sha256=np.array(hashlib.sha256(arr).hexdigest()))

        atomic_write(cache, save)
    return [torch.from_numpy(a) for a in arrays], keys


def _from_factory(spec: str, kwargs: dict) -> DataBundle:
    from .models import ModelError, resolve_factory

    try:
        fn = resolve_factory(spec, "data.name")
    except ModelError as e:
        raise DataError(str(e)) from None
    try:
        out = fn(**kwargs)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ''
        raise DataError(f"data.kwargs: {spec}(**{shown(kwargs)}) failed ({type(e).__name__}: {reason})") from None
    if isinstance(out, DataBundle):
        return out
    expected = f"data.name: {spec} must return a DataBundle or (train, test, num_classes): two datasets and an int"
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise DataError(f"{expected}; it returned {type(out).__name__}")
    train, test, num_classes = out
    if not all(hasattr(d, "__len__") and hasattr(d, "__getitem__") for d in (train, test)) or \
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"{expected}; it returned ({', '.join(type(v).__name__ for v in out)})")
    try:
        x0, _ = train[0]
    except Exception as e:
        raise DataError(f"{expected}; its training set's first item is not an (image, label) pair ({e})") from None
    return DataBundle(train, test, int(num_classes), tuple(x0.shape), train)


def heldout_split(n_train: int, size: int, seed: int, keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out subset of the training indices and the disjoint rest, which keeps at least `keep` images
    (one calibration batch) for BN calibration and fine-tuning."""
    if n_train - keep < 1:
        raise DataError(f"evaluation.heldout_size: the training set has only {n_train} image{'s' * (n_train != 1)}, "
                        f"too few to hold out {size} and keep {keep} for calibration and fine-tuning; it needs "
                        f"{size + keep} (at the least {keep + 1}, with evaluation.heldout_size=1): add training "
                        "images, or lower evaluation.heldout_size and evaluation.batch_size")
    if not 0 < size <= n_train - keep:
        raise DataError(f"evaluation.heldout_size: must be in [1, {n_train - keep}] for this training set of {n_train} "
                        f"images (at least {keep} stay for calibration and fine-tuning), got {size}")
    perm = np.random.default_rng([seed, 7]).permutation(n_train)
    return np.sort(perm[:size]), perm[size:]


def collate(items: list) -> tuple[torch.Tensor, object]:
    """A batch of (image, target) items: the images stacked, the targets stacked where they are numbers or tensors
    of one shape (labels, masks), else a list (box lists of any length)."""
    images, targets = zip(*items)
    x = torch.stack([torch.as_tensor(i) for i in images])
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
        return x, torch.tensor(targets)
    if all(isinstance(t, torch.Tensor) for t in targets) and len({t.shape for t in targets}) == 1:
        return x, torch.stack(targets)
    return x, list(targets)


def join_targets(batches) -> np.ndarray | list:
    """The targets of several batches as one: an array where they are tensors (labels, masks), else a list."""
    if all(isinstance(t, torch.Tensor) for t in batches):
        return torch.cat(batches).numpy()
    return [t for batch in batches for t in batch]


class _Order(Sampler):
    """The indices of the current pass, in order (set before each pass; the loader's workers persist)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchReader:
    """Reads (x, target) batches of one dataset in any order. A dataset with `get_batch` (in memory) is sliced in
    this process; any other is read by one DataLoader with `num_workers` worker processes that persist across
    passes (pinned memory on CUDA), its targets collated by `collate`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, num_workers: int = 0, persistent: bool = True):
        self.batch_size = batch_size
        self._get_batch: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = getattr(dataset, "get_batch",
                                                                                              None)
        self._order = _Order()
        self._loader: DataLoader | None = None
        if self._get_batch is None:  # DataLoader reads any map-style data set; torch's annotation names Dataset only
            self._loader = DataLoader(
                dataset, batch_size=batch_size, sampler=self._order, num_workers=num_workers,  # type: ignore[arg-type]
                persistent_workers=persistent and num_workers > 0, pin_memory=torch.cuda.is_available(),
                collate_fn=collate)

    def __call__(self, indices) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over `indices`, in the given order."""
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if self._get_batch is not None:
            for start in range(0, len(indices), self.batch_size):
                yield self._get_batch(indices[start:start + self.batch_size])
            return
        assert self._loader is not None  # built for every data set without get_batch
        self._order.indices = indices.tolist()
        try:
            yield from self._loader
        except DataError as e:  # raised in a worker: the loader wraps it in the worker's traceback
            if "\nOriginal Traceback" not in str(e):
                raise
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def iterate_batches(dataset: ImageDataset, indices, batch_size: int, num_workers: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of `dataset` over `indices` in the given order (one pass)."""
    yield from BatchReader(dataset, batch_size, num_workers, persistent=False)(indices)
