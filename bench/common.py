"""Helpers shared by the benchmark scripts: machine description, medians, JSON output, tables."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    """Where the figures were measured."""
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def time_side_by_side(nets: dict, example, threads: int, rounds: int = 5) -> dict:
    """Median batch latency in ms of each named net, timed in interleaved rounds so all see the same machine."""
    from prunetune.workers.timing import time_forward

    timed = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            timed[name].append(time_forward(net, example, repeats=30, threads=threads).median_ms)
    return {name: median(times) for name, times in timed.items()}


def save(name: str, payload: dict) -> str:
    """Write results/NAME.json (with the machine description) and return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=1)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table of the given columns."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "" if v is None else str(v)


CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "resnet20-cifar10.pt")


def cifar_arguments(parser) -> None:
    """The arguments of a study on the CIFAR-10 checkpoint: --data, --checkpoint, --model, --threads."""
    parser.add_argument("--data", required=True, help="the CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=os.cpu_count())


def cifar_model(args):
    """The CIFAR-10 data (decoded once into the prunetune cache) and the trained model, in eval mode; sets the
    torch threads."""
    from prunetune import build_model, load_data
    from prunetune.workers.models import load_checkpoint

    torch.set_num_threads(args.threads)
    data = load_data("imagefolder", path=args.data, cache_dir=os.path.expanduser("~/.cache/prunetune"))
    model = build_model(args.model, data.num_classes, 3)
    load_checkpoint(model, args.checkpoint)
    return data, model.eval()
