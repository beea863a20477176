"""Fine-tuning throughput on a folder of 224 px JPEGs (made from the CIFAR-10 image folder, upscaled; never in the
repository): JPEG decode rate per decoder, then images/s of one training epoch through prunetune's finetune() and
through a plain PyTorch loop (DataLoader with the same workers, the same model, data and batches), for each
--workers count; then images/s of finetune() data-parallel over --ddp processes (DistributedDataParallel, gloo,
as a Ray Train finalist's workers run it; batch_size stays the global batch). Figures for docs/guides/data.md
("Reading images") and docs/guides/finetuning.md ("Data-parallel finalists").

    python bench/finetune.py --data /tmp/cifar10 --jpeg-dir /tmp/prunetune-jpeg224   (or --smoke)
"""
from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
import torch.nn as nn

from common import median, parse_args, save, smoke_dir, table


def make_jpegs(source: str, out: str, per_class: int, size: int) -> str:
    """OUT/{train,test}/<class>/*.jpg: the first per_class (train) and per_class // 5 (test) images of each class
    of SOURCE, upscaled to size x size (bicubic), JPEG quality 90; kept when already there."""
    from PIL import Image

    for split, count in (("train", per_class), ("test", max(1, per_class // 5))):
        for cls in sorted(os.listdir(os.path.join(source, split))):
            folder = os.path.join(out, split, cls)
            if os.path.isdir(folder) and len(os.listdir(folder)) >= count:
                continue
            os.makedirs(folder, exist_ok=True)
            for name in sorted(os.listdir(os.path.join(source, split, cls)))[:count]:
                with Image.open(os.path.join(source, split, cls, name)) as im:
                    im.convert("RGB").resize((size, size), Image.BICUBIC).save(os.path.join(folder, name), quality=90)
    return out


def make_smoke_source(root: str, size: int = 32) -> str:
    """A tiny image folder of random JPEGs (two classes) for --smoke."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(12):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{i}.jpg"))
    return root


def decode_rates(files: list[str], rounds: int) -> dict:
    """Images/s of decoding the files to RGB arrays with each decoder that imports here."""
    from PIL import Image

    blobs = [open(f, "rb").read() for f in files]

    def pillow(blob):
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.convert("RGB"))

    def pillow_draft_half(blob):  # what a resize to half the size can ask the JPEG decoder for (DCT scaling)
        with Image.open(io.BytesIO(blob)) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            return np.asarray(im.convert("RGB"))

    decoders = {"pillow": pillow, "pillow, draft to 1/2": pillow_draft_half}
    try:
        import simplejpeg

        decoders["simplejpeg"] = lambda blob: simplejpeg.decode_jpeg(blob, colorspace="RGB")
    except ImportError:
        pass
    rates = {}
    for name, decode in decoders.items():
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for blob in blobs:
                decode(blob)
            best = min(best, time.perf_counter() - t0)
        rates[name] = len(blobs) / best
    return rates


def small_net(num_classes: int) -> nn.Module:
    """A small CNN for 224 px input: cheap enough that reading the images is what an epoch waits for."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def reference_epoch(data, ft, workers: int) -> float:
    """Seconds of one epoch of a plain PyTorch loop over the same batches finetune() trains on."""
    from torch.utils.data import DataLoader, Subset

    model = small_net(data.num_classes)
    n = len(data.train_augmented)
    steps = max(1, n // ft.batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ft.seed * 10_007))[: steps * ft.batch_size]
    loader = DataLoader(Subset(data.train_augmented, order.tolist()), batch_size=ft.batch_size, num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov,
                                weight_decay=ft.weight_decay)
    criterion = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def ddp_epoch(rank: int, world: int, port: int, folder: str, size: int, ft, threads: int, out: str) -> None:
    """One process of a data-parallel epoch of finetune(); rank 0 writes the epoch's seconds to `out`."""
    from torch import distributed as dist

    from prunetune import FinetuneOptions, finetune, load_data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    data = load_data("imagefolder", path=folder, image_size=size)
    result = finetune(small_net(data.num_classes), data, ft, FinetuneOptions(log=io.StringIO(), data_parallel=True))
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(result["history"][-1]["epoch_seconds"]))
    dist.destroy_process_group()


def ddp_seconds(world: int, folder: str, size: int, ft, threads: int) -> float:
    """Seconds of one data-parallel finetune() epoch over `world` processes."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(ddp_epoch, args=(world, port, folder, size, ft, threads, out), nprocs=world)
        return float(open(out).read())


def main() -> None:
    from prunetune import FinetuneOptions, FinetuneSettings, finetune, load_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the CIFAR-10 image folder (train/, test/); not with --smoke")
    parser.add_argument("--jpeg-dir", default="/tmp/prunetune-jpeg224", help="where the 224 px JPEGs are made")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--ddp", default="1,2", help="data-parallel process counts (empty: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per setting (the median is kept)")
    args = parse_args(parser, {"per_class": 10, "size": 72, "workers": "0,1", "ddp": "2", "batch_size": 8,
                                       "rounds": 1},
                      require=("data",))
    if args.smoke:
        args.data = make_smoke_source(os.path.join(smoke_dir(), "source"))
        args.jpeg_dir = os.path.join(smoke_dir(), "jpeg")
    torch.set_num_threads(args.threads)
    folder = make_jpegs(args.data, args.jpeg_dir, args.per_class, args.size)
    data = load_data("imagefolder", path=folder, image_size=args.size)
    files = data.train.files[:200]
    rates = decode_rates(files, rounds=3)
    print(table([{"decoder": k, "images_per_s": v} for k, v in rates.items()], ["decoder", "images_per_s"]), flush=True)
    ft = FinetuneSettings(batch_size=args.batch_size, epochs=1)
    n = (len(data.train_augmented) // ft.batch_size) * ft.batch_size
    counts = [int(w) for w in args.workers.split(",")]
    seconds = {(w, loop): [] for w in counts for loop in ("finetune", "reference")}
    for _ in range(args.rounds):  # interleaved, so every setting sees the same (shared) machine
        for workers in counts:
            seconds[workers, "reference"].append(reference_epoch(data, ft, workers))
            result = finetune(small_net(data.num_classes), data, ft, FinetuneOptions(num_workers=workers,
                                                                                     log=io.StringIO()))
            seconds[workers, "finetune"].append(result["history"][-1]["epoch_seconds"])
    rows = [{"workers": w, "images": n, "finetune_images_per_s": n / median(seconds[w, "finetune"]),
             "reference_images_per_s": n / median(seconds[w, "reference"]),
             "ratio": median(seconds[w, "reference"]) / median(seconds[w, "finetune"])} for w in counts]
    print(table(rows, list(rows[0])))
    worlds = [int(w) for w in args.ddp.split(",") if w]
    ddp = {w: [] for w in worlds}
    for _ in range(args.rounds):
        for world in worlds:
            ddp[world].append(ddp_seconds(world, folder, args.size, ft, args.threads))
    ddp_rows = [{"ddp_processes": w, "images": n, "images_per_s": n / median(ddp[w]),
                 "images_per_s_per_process": n / median(ddp[w]) / w} for w in worlds]
    if ddp_rows:
        print(table(ddp_rows, list(ddp_rows[0])))
    path = save("finetune", {"settings": {k: v for k, v in vars(args).items() if k != "smoke"},
                             "decode_images_per_s": rates, "epochs": rows, "ddp": ddp_rows,
                             "cpu_count": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
