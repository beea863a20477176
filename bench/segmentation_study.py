"""Does the adaptive-BN score rank candidates on a segmentation task too? A study on real images, CPU-sized.

The data: canvases (32 px) of real CIFAR-10 photos, built here from the shared image folder and cached outside the
repository: a background (another photo, its quadrants shuffled and blurred) with 1-3 photos pasted on it through
rotated elliptic masks; the label of a pixel is the pasted photo's class + 1, 0 for background (11 classes). Train
canvases are made of train photos, test canvases of test photos; deterministic from --seed.
The net: a small U-Net (three conv-BN-ReLU stages down, two up with bilinear upsampling and concatenated skips,
a 1x1 head that is never pruned), trained briefly. Then, as bench/correlation.py does for classification: N
strategies at 50% FLOPs from prunetune's sampler, each pruned (PrunePlan, L1), scored by mIoU on held-out train
canvases without recalibration (vanilla), after EMA adaptive BN and after cumulative adaptive BN (the default),
fine-tuned the same short budget, and measured on the test canvases; the verdict is correlation.py's: Spearman of
each score with fine-tuned test mIoU with a bootstrap 95% interval (its "heldout_acc" columns are held-out mIoU
here), and uniform L1 pruning at the same FLOPs. mIoU: prunetune's score() with the segmentation task.
Per-candidate results are appended to a JSON-lines file as they finish, so an interrupted study resumes.

python bench/segmentation_study.py --data /tmp/cifar10     # the shared CIFAR-10 JPEGs extracted (train/, test/)
python bench/segmentation_study.py --data /tmp/cifar10 --small --candidates 20   # 10 base epochs, 1 of fine-tuning
python bench/segmentation_study.py --smoke                 # seconds: synthetic photos, 16 px canvases, 3 candidates
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import parse_args, save, smoke_dir  # noqa: E402
from bench.correlation import candidates, report, verdict  # noqa: E402
from prunetune import PrunePlan, PruningSpace, StrategySampler, recalibrate_bn  # noqa: E402
from prunetune.workers.scoring import score  # noqa: E402
from prunetune.workers.seeds import generator  # noqa: E402
from prunetune.workers.tasks import SEGMENTATION  # noqa: E402

CLASSES = 11  # background + the 10 CIFAR-10 classes
PHOTO = 32  # side of a source photo
PER_CANVAS = 4  # source photos a canvas may use: a background and up to 3 pasted objects


@dataclass
class Protocol:
    canvas: int  # side of a canvas in pixels (a multiple of 4)
    train: int  # train canvases (held-out ones included)
    heldout: int  # train canvases set aside to score candidates
    test: int  # test canvases (fine-tuned mIoU)
    width: int  # channels of the first stage (then 2x, 4x)
    base_epochs: int
    finetune_epochs: int
    calibration_batches: int  # cumulative adaptive BN; EMA gets twice as many
    batch: int


PROTOCOLS = {
    "full": Protocol(canvas=32, train=3000, heldout=400, test=1000, width=16, base_epochs=30, finetune_epochs=2,
                     calibration_batches=10, batch=64),
    "small": Protocol(canvas=32, train=3000, heldout=400, test=600, width=16, base_epochs=10, finetune_epochs=1,
                      calibration_batches=10, batch=64),
    "smoke": Protocol(canvas=16, train=96, heldout=32, test=32, width=8, base_epochs=1, finetune_epochs=1,
                      calibration_batches=2, batch=16),
}


def block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """A small U-Net: two conv blocks per stage at 1, 1/2, 1/4 resolution, bilinear upsampling with concatenated
    skips back to full resolution, a 1x1 head to the classes."""

    def __init__(self, classes: int = CLASSES, width: int = 16):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(block(3, w), block(w, w))
        self.enc2 = nn.Sequential(block(w, 2 * w), block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.dec2 = block(6 * w, 2 * w)
        self.dec1 = block(3 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="bilinear"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear"), e1], 1))
        return self.head(d1)


def read_photos(root: str, split: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct photos of ROOT/SPLIT/<class>/*.jpg drawn at random: (uint8 N x 32 x 32 x 3, class ids)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise SystemExit(f"--data: {folder} is not a folder (an image folder with train/ and test/ is needed)")
    files = [(os.path.join(folder, c, f), k) for k, c in enumerate(sorted(os.listdir(folder)))
             for f in sorted(os.listdir(os.path.join(folder, c)))]
    if count > len(files):
        raise SystemExit(f"--data: {folder} holds {len(files)} photos; this protocol needs {count}")
    chosen = [files[i] for i in rng.choice(len(files), count, replace=False)]
    photos = np.stack([np.asarray(Image.open(p).convert("RGB").resize((PHOTO, PHOTO))) for p, _ in chosen])
    return photos, np.array([k for _, k in chosen])


def synthetic_photos(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for photos in a smoke run: noise around a colour of the class."""
    labels = rng.integers(0, CLASSES - 1, count)
    colours = np.random.default_rng(0).integers(0, 256, (CLASSES - 1, 3))
    photos = colours[labels][:, None, None, :] + rng.normal(0, 40, (count, PHOTO, PHOTO, 3))
    return np.clip(photos, 0, 255).astype(np.uint8), labels


def ellipse(side: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean side x side mask: a randomly rotated ellipse with unequal axes filling most of the square."""
    yy, xx = (np.mgrid[:side, :side] + 0.5 - side / 2) / (side / 2)
    theta = rng.uniform(0, np.pi)
    u, v = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    return (u / rng.uniform(0.8, 1.0)) ** 2 + (v / rng.uniform(0.45, 0.75)) ** 2 <= 1


def make_canvases(photos: np.ndarray, labels: np.ndarray, side: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One canvas per PER_CANVAS photos: (uint8 N x side x side x 3 images, uint8 N x side x side label maps)."""
    n = len(photos) // PER_CANVAS
    images, masks = np.zeros((n, side, side, 3), np.uint8), np.zeros((n, side, side), np.uint8)
    half = side // 2
    for i in range(n):
        group = range(i * PER_CANVAS, (i + 1) * PER_CANVAS)
        back = np.asarray(Image.fromarray(photos[group[0]]).resize((side, side), Image.BILINEAR))
        quads = [back[r:r + half, c:c + half] for r in (0, half) for c in (0, half)]
        order = rng.permutation(4)
        back = np.concatenate([np.concatenate([quads[order[0]], quads[order[1]]], 1),
                               np.concatenate([quads[order[2]], quads[order[3]]], 1)], 0)
        images[i] = np.asarray(Image.fromarray(back).filter(ImageFilter.GaussianBlur(side / 24)))
        for j in group[1:1 + rng.integers(1, PER_CANVAS)]:
            s = int(rng.integers(int(0.45 * side), int(0.7 * side) + 1))
            obj = np.asarray(Image.fromarray(photos[j]).resize((s, s), Image.BILINEAR))
            shape = ellipse(s, rng)
            r, c = rng.integers(0, side - s + 1, 2)
            images[i, r:r + s, c:c + s][shape] = obj[shape]
            masks[i, r:r + s, c:c + s][shape] = labels[j] + 1
    return images, masks


def build_data(proto: Protocol, root: str | None, seed: int, cache: str) -> dict[str, np.ndarray]:
    """Train and test canvases (cached as .npz in `cache`); synthetic photos when `root` is None."""
    path = os.path.join(cache, f"canvases-{proto.canvas}-{proto.train}-{proto.test}-s{seed}.npz")
    if root and os.path.isfile(path):
        return dict(np.load(path))
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", proto.train), ("test", proto.test)):
        photos, labels = (read_photos(root, split, n * PER_CANVAS, rng) if root
                          else synthetic_photos(n * PER_CANVAS, rng))
        data[f"{split}_x"], data[f"{split}_y"] = make_canvases(photos, labels, proto.canvas, rng)
    if root:
        np.savez(path, **data)
    return data


def to_tensors(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Images as normalized float N x 3 x H x W (train statistics), labels as int64 N x H x W."""
    train = data["train_x"].astype(np.float32) / 255
    mean, std = train.mean((0, 1, 2)), train.std((0, 1, 2))
    out = {}
    for split in ("train", "test"):
        x = (data[f"{split}_x"].astype(np.float32) / 255 - mean) / std
        out[f"{split}_x"] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.from_numpy(data[f"{split}_y"].astype(np.int64))
    return out


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int,
          salt: str) -> None:
    """SGD (nesterov, weight decay 5e-4) with a cosine schedule per step, random horizontal flips."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + np.cos(np.pi * k / steps)))
    model.train()
    for epoch in range(epochs):
        g = generator(seed, f"{salt}-{epoch}")
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
            loss = SEGMENTATION.loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def miou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """mIoU of `model` on (x, y): prunetune's scoring with the segmentation task (per-class intersection and union
    summed over batches; mean over the classes present in the labels or the predictions)."""
    return score(model, ((x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)), task=SEGMENTATION)["miou"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", help="the CIFAR-10 image folder (train/, test/); not with --smoke")
    p.add_argument("--small", action="store_true", help="the small protocol: 10 base epochs, 1 fine-tuning epoch")
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--max-ratio", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core machine)")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/prunetune/segmentation"))
    p.add_argument("--seed", type=int, default=0)
    args = parse_args(p, {"candidates": 3}, require=("data",))
    wall = time.time()
    size = "smoke" if args.smoke else "small" if args.small else "full"
    proto = PROTOCOLS[size]
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.workdir = os.path.join(smoke_dir(), "segmentation")
    os.makedirs(args.workdir, exist_ok=True)
    tag = f"{size}-s{args.seed}"
    t = time.time()
    data = to_tensors(build_data(proto, None if args.smoke else args.data, args.seed, args.workdir))
    order = torch.randperm(proto.train, generator=generator(args.seed, "heldout"))
    heldout, rest = order[:proto.heldout], order[proto.heldout:]
    hx, hy = data["train_x"][heldout], data["train_y"][heldout]
    tx, ty = data["train_x"][rest], data["train_y"][rest]
    print(f"data: {proto.train} train canvases ({proto.heldout} held out), {proto.test} test, {proto.canvas} px, "
          f"{time.time() - t:.0f}s", flush=True)

    # 1. the base model, trained on the training canvases minus the held-out ones (cached)
    torch.manual_seed(args.seed)
    model = SegNet(CLASSES, proto.width)
    base_path = os.path.join(args.workdir, f"segnet-base-{tag}.pt")
    if os.path.isfile(base_path):
        model.load_state_dict(torch.load(base_path, map_location="cpu", weights_only=True))
    else:
        t = time.time()
        train(model, tx, ty, proto.base_epochs, 0.1, proto.batch, args.seed, "base")
        torch.save(model.state_dict(), base_path)
        print(f"base model: {proto.base_epochs} epochs in {time.time() - t:.0f}s", flush=True)
    base = {"heldout_miou": miou(model, hx, hy, 2 * proto.batch),
            "test_miou": miou(model, data["test_x"], data["test_y"], 2 * proto.batch)}
    print(f"base model: held-out mIoU {base['heldout_miou']:.4f}, test mIoU {base['test_miou']:.4f}", flush=True)

    space = PruningSpace.from_model(model, hx[:1])
    sampler = StrategySampler(space, args.target, args.tolerance, args.max_ratio, seed=args.seed)
    plan = PrunePlan(model, space)
    calibration = [tx[i:i + proto.batch] for i in range(0, 2 * proto.calibration_batches * proto.batch, proto.batch)]
    modes = {"vanilla": ("none", 0), "ema": ("ema", 2 * proto.calibration_batches),
             "cumulative": ("cumulative", proto.calibration_batches)}

    # 2. candidates (and the uniform baseline as index -1), results appended as they finish
    log_path = os.path.join(args.workdir, f"candidates-{tag}.jsonl")
    done, todo, uniform = candidates(log_path, space, sampler, args)
    for index, ratios in todo:
        start = time.time()
        rec = {"index": index, "ratios": [float(r) for r in ratios],
               "flops_ratio": space.flops(ratios) / space.base_flops}
        pruned = plan.apply(ratios)
        for name, (mode, batches) in modes.items():
            net = copy.deepcopy(pruned)
            recalibrate_bn(net, calibration[:batches], mode)
            rec[name] = miou(net, hx, hy, 2 * proto.batch)
            if name == "cumulative":
                train(net, tx, ty, proto.finetune_epochs, 0.02, proto.batch, args.seed, "finetune")
                rec["finetuned"] = miou(net, data["test_x"], data["test_y"], 2 * proto.batch)
        rec["seconds"] = time.time() - start
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[index] = rec
        print(f"candidate {index:3d}: FLOPs {rec['flops_ratio']:.3f} held-out mIoU vanilla {rec['vanilla']:.3f} "
              f"ema {rec['ema']:.3f} cumulative {rec['cumulative']:.3f} -> fine-tuned test mIoU "
              f"{rec['finetuned']:.3f} ({rec['seconds']:.0f}s)", flush=True)

    # 3. the verdict
    cands = [done[i] for i in range(args.candidates)]
    rows, summary = verdict(cands, done[-1], list(modes))
    summary.update({"uniform_ratio": uniform, "groups": len(space.groups), "base": base,
                    "base_flops": space.base_flops, "wall_s": time.time() - wall})
    print(f"\nSegNet on CIFAR-10 canvases, {args.candidates} candidates at {args.target} +- {args.tolerance} FLOPs, "
          f"{len(space.groups)} groups, max ratio {args.max_ratio}, protocol {tag}: {proto}")
    report(rows, summary)
    path = save(f"segmentation-{tag}", {"args": vars(args), "protocol": proto.__dict__, "rows": rows,
                                        "summary": summary, "candidates": [done[-1]] + cands})
    print(f"saved {path}; wall time {summary['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
