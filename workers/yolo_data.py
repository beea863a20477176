"""data.name `yolo`: a data set in the YOLO format Ultralytics reads, named by its dataset YAML (data.path).

The YAML gives `path` (the root; relative to the YAML's folder, or absent: that folder), `train` and `val` (each a
folder of images, searched recursively, a .txt file listing images, or a list of those; relative to the root) and
`names` (a list, or a dict from class index to name). Each image's labels are the .txt file at its path with the
last `images` folder replaced by `labels`: one line per object, `class cx cy w h` normalised to the image (a
polygon line `class x1 y1 x2 y2 ...` counts as its bounding box); an image without a label file has no objects.
`val` is prunetune's test split (the held-out and validation splits are drawn from `train`, workers/splits.py); a
YAML's `test` is not read (COCO's has no labels).

Images are letterboxed to data.image_size (a multiple of 32, the largest stride of a YOLO head; default 640): scaled
to fit, centred on grey (114), as Ultralytics' validation letterbox does, the boxes moved with them; values / 255,
no mean or std (Ultralytics' input). Training adds a random horizontal flip (Ultralytics' mosaic, HSV and scale
augmentations are not reproduced). Targets are the labels per image, [k, 5] float (class, cx, cy, w, h normalised to
the letterboxed image), collated into a list (data.collate).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from .data import DataBundle, DataError, InputContract, _open_image, _rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_SIZE, STRIDE, PAD_VALUE = 640, 32, 114


def label_path(image: str) -> str:
    """The label file of an image, as Ultralytics finds it (the last /images/ replaced by /labels/, suffix .txt)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return os.path.splitext(labels.join(image.rsplit(images, 1)))[0] + ".txt"


def read_labels(path: str, classes: int) -> torch.Tensor:
    """The labels [k, 5] (class, cx, cy, w, h) of one label file (none if it does not exist); DataError naming the
    file and line of a bad one."""
    if not os.path.isfile(path):
        return torch.zeros(0, 5)
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            values = line.split()
            if not values:
                continue
            try:
                numbers = [float(v) for v in values]
            except ValueError:
                numbers = []
            box = None
            if len(numbers) == 5:
                box = numbers[1:]
            elif len(numbers) >= 7 and len(numbers) % 2:  # a polygon: its bounding box
                xs, ys = numbers[1::2], numbers[2::2]
                box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
            valid = box is not None and numbers[0] == int(numbers[0]) and 0 <= numbers[0] < classes \
                and all(0 <= v <= 1 for v in box)
            if box is None or not valid:
                raise DataError(f"data.path: {path} line {number}: expected 'class cx cy w h' with a class in [0, "
                                f"{classes - 1}] and coordinates normalised to [0, 1], got '{line.strip()[:80]}'")
            rows.append([numbers[0], *box])
    return torch.tensor(rows, dtype=torch.float32).view(-1, 5)


def _images(entry: str, root: str, field: str) -> list[str]:
    """The image files of one `train`/`val` entry: a folder (recursively) or a .txt list, relative to `root`."""
    path = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(root, entry))
    if os.path.isdir(path):
        return sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                      if name.lower().endswith(IMAGE_SUFFIXES))
    if os.path.isfile(path) and path.endswith(".txt"):
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        base = os.path.dirname(path)
        return [line if os.path.isabs(line) else os.path.normpath(os.path.join(base, line)) for line in lines]
    raise DataError(f"data.path: {field} '{entry}' is neither a folder of images nor a .txt list of them ({path})")


def _names(value: object, source: str) -> tuple[str, ...]:
    """The class names of a YAML's `names`: a list, or a dict from 0, 1, ... to names."""
    if isinstance(value, dict) and sorted(value) == list(range(len(value))) and value:
        return tuple(str(value[i]) for i in range(len(value)))
    if isinstance(value, list) and value:
        return tuple(str(v) for v in value)
    raise DataError(f"data.path: {source} needs 'names': a list of class names, or a dict from 0, 1, ... to names")


def letterbox(image, size: int) -> tuple[torch.Tensor, float, int, int]:
    """A Pillow image scaled to fit `size` x `size` and centred on grey: uint8 [3, size, size], the scale and the
    left and top padding in pixels."""
    from PIL import Image

    w, h = image.size
    r = size / max(w, h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + nh, left:left + nw] = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(canvas).permute(2, 0, 1), r, left, top


class YoloImages(Dataset):
    """Image files letterboxed to `size` with their labels moved alike (a random horizontal flip with `augment`)."""

    def __init__(self, files: list[str], labels: list[torch.Tensor], size: int, augment: bool = False,
                 max_pixels: int | None = None):
        self.files, self.labels, self.size, self.augment, self.max_pixels = files, labels, size, augment, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def augmented(self) -> "YoloImages":
        """The same images with a random horizontal flip."""
        return YoloImages(self.files, self.labels, self.size, True, self.max_pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with _open_image(self.files[i], self.max_pixels) as im:
            w, h = im.size
            x, r, left, top = letterbox(_rgb(im), self.size)
        labels = self.labels[i].clone()
        labels[:, 1] = (labels[:, 1] * w * r + left) / self.size
        labels[:, 2] = (labels[:, 2] * h * r + top) / self.size
        labels[:, 3] *= w * r / self.size
        labels[:, 4] *= h * r / self.size
        x = x.float() / 255
        if self.augment and torch.rand(()) < 0.5:
            x, labels[:, 1] = x.flip(-1), 1 - labels[:, 1]
        return x, labels


def load_yolo(path: str, image_size: int | None = None, max_pixels: int | None = None) -> DataBundle:
    """The DataBundle of a YOLO dataset YAML: train, val as the test split, the class names."""
    if not os.path.isfile(path):
        raise DataError(f"data.path: data set 'yolo' needs a dataset YAML file, not found: {path}")
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"data.path: {path} is not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"data.path: {path} must be a YAML mapping with train, val and names")
    missing = [key for key in ("train", "val", "names") if not spec.get(key)]
    if missing:
        raise DataError(f"data.path: {path} lacks {', '.join(missing)} (a YOLO dataset YAML gives train, val and "
                        "names; path optional)")
    size = image_size or DEFAULT_SIZE
    if size % STRIDE:
        raise DataError(f"data.image_size: yolo data is letterboxed to a multiple of {STRIDE} (the largest stride of "
                        f"a YOLO head), got {size}")
    names = _names(spec["names"], path)
    here = os.path.dirname(os.path.abspath(path))
    root = spec.get("path") or here
    root = root if os.path.isabs(str(root)) else os.path.normpath(os.path.join(here, str(root)))
    splits = []
    for key in ("train", "val"):
        entries = spec[key] if isinstance(spec[key], list) else [spec[key]]
        files = [f for entry in entries for f in _images(str(entry), root, key)]
        if not files:
            raise DataError(f"data.path: {key} of {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits.append((files, [read_labels(label_path(f), len(names)) for f in files]))
    (train_files, train_labels), (val_files, val_labels) = splits
    notes = []
    unlabelled = sum(len(t) == 0 for t in train_labels)
    if unlabelled == len(train_labels):
        raise DataError(f"data.path: no training image of {path} has a label (expected labels/*.txt beside images/)")
    if unlabelled:
        notes.append(f"data.path: {unlabelled} of {len(train_labels)} training images have no objects (no label "
                     "file, or an empty one); they train as background")
    train = YoloImages(train_files, train_labels, size, max_pixels=max_pixels)
    shape = (3, size, size)
    contract = InputContract(shape, 1 / 255, (0.0,) * 3, (1.0,) * 3, names,
                             f"a letterbox to {size} px (scaled to fit, centred on grey {PAD_VALUE})")
    return DataBundle(train, YoloImages(val_files, val_labels, size, max_pixels=max_pixels), len(names), shape,
                      train.augmented(), contract, notes)
