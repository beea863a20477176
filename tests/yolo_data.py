"""A tiny data set in the YOLO format (a dataset YAML, images/ and labels/*.txt), written where a test asks: noise
images of a few sizes (square and not, so the letterbox pads) with 1 to 3 squares each, class c in colour c
(red, green, blue, ...), their labels `class cx cy w h` normalised to the image."""
from __future__ import annotations

import os

import numpy as np
import yaml
from PIL import Image

COLOURS = ((255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40))
SIZES = ((64, 64), (80, 48), (48, 72))  # width, height


def write_yolo_dataset(root: str, train: int = 48, val: int = 16, classes: int = 3, seed: int = 0) -> str:
    """Write the data set under `root` (`train` and `val` images, the squares drawn with `seed`) and return its
    YAML's path (its `path` absolute: Ultralytics reads a relative one from the working directory, prunetune from the
    YAML's folder)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
        for i in range(count):
            w, h = SIZES[i % len(SIZES)]
            pixels = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                side = int(rng.integers(10, 24))
                x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                cls = int(rng.integers(0, classes))
                pixels[y0:y0 + side, x0:x0 + side] = COLOURS[cls % len(COLOURS)]
                lines.append(f"{cls} {(x0 + side / 2) / w:.6f} {(y0 + side / 2) / h:.6f} {side / w:.6f} {side / h:.6f}")
            Image.fromarray(pixels).save(os.path.join(root, "images", split, f"{i:04d}.png"))
            with open(os.path.join(root, "labels", split, f"{i:04d}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    path = os.path.join(root, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"path": os.path.abspath(root), "train": "images/train", "val": "images/val",
                        "names": {i: f"class{i}" for i in range(classes)}}, f)
    return path
