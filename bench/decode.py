"""JPEG decoding as the driver does it, on a folder of 256 px JPEGs (made from the CIFAR-10 image folder, upscaled;
never in the repository): images/s of Pillow and of simplejpeg (when installed) in one process, alone and followed
by the eval resize + centre crop to 224 px, and the largest pixel difference between the two decoders; then
images/s of the driver's decode with each --workers count (data.num_workers): the calibration and held-out
images of 224 px input (evaluation_data) and an image folder decoded into memory at 64 px (load_data). Median
of --rounds interleaved runs. Figures for the "Reading images" paragraph of docs/guides/data.md.

    python bench/decode.py --data /tmp/cifar10 --jpeg-dir /tmp/prunetune-jpeg256   (or --smoke)
"""
from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

from common import median, parse_args, save, smoke_dir, table
from finetune import make_jpegs, make_smoke_source


def decoders() -> dict:
    """JPEG bytes -> uint8 RGB [H, W, 3], per decoder that imports here."""
    from PIL import Image

    def pillow(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.convert("RGB"))

    found = {"pillow": pillow}
    try:
        import simplejpeg

        found["simplejpeg"] = lambda blob: simplejpeg.decode_jpeg(blob, colorspace="RGB")
    except ImportError:
        pass
    return found


def decoder_rates(files: list[str], rounds: int, size: int) -> tuple[list[dict], dict]:
    """Images/s of each decoder over the files (median of interleaved rounds), alone and with the eval resize +
    crop to `size`; and the largest absolute pixel difference of each decoder from Pillow."""
    from PIL import Image

    from prunetune.workers.data import _center_crop

    blobs = [open(f, "rb").read() for f in files]
    found = decoders()
    seconds = {(name, crop): [] for name in found for crop in (False, True)}
    for _ in range(rounds):
        for name, decode in found.items():
            for crop in (False, True):
                t0 = time.perf_counter()
                for blob in blobs:
                    pixels = decode(blob)
                    if crop:
                        _center_crop(Image.fromarray(pixels), size)
                seconds[name, crop].append(time.perf_counter() - t0)
    rows = [{"decoder": name, "then": f"resize + crop to {size}" if crop else "-",
             "images_per_s": len(blobs) / median(s)} for (name, crop), s in seconds.items()]
    reference = [found["pillow"](b).astype(np.int16) for b in blobs]
    differences = {name: int(max(np.abs(decode(b).astype(np.int16) - r).max() for b, r in zip(blobs, reference)))
                   for name, decode in found.items() if name != "pillow"}
    return rows, differences


def driver_rates(folder: str, counts: list[int], rounds: int, eval_size: int, small_size: int, heldout: int,
                 batch: int) -> list[dict]:
    """Images/s of the driver's decode for each num_workers: evaluation_data's calibration (2 batches) and
    held-out images at `eval_size`, and load_data's in-memory arrays at `small_size` (no cache)."""
    from prunetune import EvaluationSettings, load_data
    from prunetune.workers.evaluator import evaluation_data

    cfg = EvaluationSettings(heldout_size=heldout, batch_size=batch, calibration_batches=2)
    data = load_data("imagefolder", path=folder, image_size=eval_size)
    n_eval = heldout + 2 * batch
    n_small = len(data.train) + len(data.test)
    seconds = {(w, what): [] for w in counts for what in ("eval", "small")}
    for _ in range(rounds):
        for w in counts:
            t0 = time.perf_counter()
            evaluation_data(data, cfg, num_workers=w)
            seconds[w, "eval"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_data("imagefolder", path=folder, image_size=small_size, num_workers=w)
            seconds[w, "small"].append(time.perf_counter() - t0)
    return [{"num_workers": w, f"calibration+heldout_{eval_size}px_images": n_eval,
             "calibration+heldout_images_per_s": n_eval / median(seconds[w, "eval"]),
             f"folder_{small_size}px_images": n_small, "folder_images_per_s": n_small / median(seconds[w, "small"])}
            for w in counts]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the CIFAR-10 image folder (train/, test/); not with --smoke")
    parser.add_argument("--jpeg-dir", default="/tmp/prunetune-jpeg256", help="where the 256 px JPEGs are made")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--size", type=int, default=256, help="side of the JPEGs made")
    parser.add_argument("--eval-size", type=int, default=224, help="the model's input side (resize + crop)")
    parser.add_argument("--small-size", type=int, default=64, help="side of the in-memory arrays (64 or less)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out images (plus 2 calibration batches)")
    parser.add_argument("--batch", type=int, default=100, help="calibration batch size")
    parser.add_argument("--files", type=int, default=300, help="files timed per decoder")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=5, help="runs per setting (the median is kept)")
    args = parse_args(parser, {"per_class": 4, "size": 80, "eval_size": 72, "small_size": 16, "heldout": 2,
                               "batch": 2, "files": 10, "workers": "0,2", "rounds": 1}, require=("data",))
    if args.smoke:
        args.data = make_smoke_source(os.path.join(smoke_dir(), "source"))
        args.jpeg_dir = os.path.join(smoke_dir(), "jpeg")
    torch.set_num_threads(1)
    folder = make_jpegs(args.data, args.jpeg_dir, args.per_class, args.size)
    files = sorted(os.path.join(parent, name) for parent, _, names in os.walk(os.path.join(folder, "train"))
                   for name in names)[: args.files]
    rows, differences = decoder_rates(files, args.rounds, args.eval_size)
    print(table(rows, list(rows[0])), flush=True)
    print(f"largest pixel difference from Pillow: {differences or 'no other decoder installed'}", flush=True)
    counts = [int(w) for w in args.workers.split(",")]
    driver = driver_rates(folder, counts, args.rounds, args.eval_size, args.small_size, args.heldout, args.batch)
    print(table(driver, list(driver[0])))
    from prunetune.workers.data import FAST_JPEG

    path = save("decode", {"settings": {k: v for k, v in vars(args).items() if k != "smoke"},
                           "driver_decoder": "pillow" if FAST_JPEG is None else "simplejpeg", "decoders": rows,
                           "max_pixel_difference_from_pillow": differences, "driver": driver})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
