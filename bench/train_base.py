"""Train a CIFAR-10 base model for the studies (search quality, calibration budget) and save it under bench/.

    tar xzf ../shared/data/cifar10-imagefolder.tar.gz -C /tmp/cifar10
    python bench/train_base.py --data /tmp/cifar10/cifar10 --model resnet20 --epochs 30

The standard recipe (SGD, Nesterov momentum 0.9, lr 0.1 with one warm-up epoch and a cosine decay, weight decay
5e-4, batch 128, random crop with 4 px padding and horizontal flips) on the 50,000 training images, tested on the
10,000 test images after every epoch; on a GPU when one is at hand. Writes bench/checkpoints/MODEL-cifar10.pt
(a plain state dict: `model.checkpoint` takes it) and MODEL-cifar10.json (test accuracy, recipe, time, machine).
`--smoke`: 1 epoch on tiny synthetic data, on the CPU, the checkpoint written to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import checkpoints_dir, machine, parse_args, smoke_data  # noqa: E402
from prunetune import FinetuneOptions, build_model, finetune, load_config, load_data  # noqa: E402
from prunetune.workers.files import atomic_write, write_json  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the CIFAR-10 image folder (train/<class>, test/<class>); not with --smoke")
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parse_args(parser, {"epochs": 1, "threads": 1}, require=("data",))
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    data = smoke_data() if args.smoke else load_data("imagefolder", path=args.data,
                                                     cache_dir=os.path.expanduser("~/.cache/prunetune"))
    folder = checkpoints_dir()
    os.makedirs(folder, exist_ok=True)
    cfg = load_config(None, [f"finetune.lr={args.lr}", "finetune.weight_decay=5e-4", "finetune.batch_size=128",
                             "finetune.warmup_epochs=1", f"finetune.seed={args.seed}",
                             f"finetune.epochs={args.epochs}"]).finetune.settings()
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.num_classes, 3)
    checkpoint = os.path.join(folder, f"{args.model}-cifar10.resume.pt")  # resumable; removed at the end
    start = time.time()
    result = finetune(model, data, cfg, FinetuneOptions(device, checkpoint_path=checkpoint))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    path = os.path.join(folder, f"{args.model}-cifar10.pt")
    atomic_write(path, lambda tmp: torch.save(state, tmp), durable=True)
    os.remove(checkpoint)
    summary = {"model": args.model, "test_accuracy": result["test_accuracy"], "epochs": args.epochs,
               "recipe": {k: getattr(cfg, k) for k in ("lr", "momentum", "nesterov", "weight_decay", "batch_size",
                                                       "warmup_epochs", "seed")},
               "augmentation": "random crop (4 px padding), horizontal flip", "train_images": len(data.train),
               "test_images": len(data.test), "seconds": time.time() - start, "device": device,
               "machine": machine(), "history": [{k: h[k] for k in ("epoch", "train_loss", "test_accuracy")}
                                                 for h in result["history"]]}
    write_json(os.path.join(folder, f"{args.model}-cifar10.json"), summary)
    print(json.dumps({k: summary[k] for k in ("model", "test_accuracy", "epochs", "seconds")}))


if __name__ == "__main__":
    main()
