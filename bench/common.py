"""Helpers shared by the benchmark scripts: machine description, medians, JSON output, tables, and the
`--smoke` mode every script has (tiny synthetic inputs, seconds, output to a temporary directory)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
CHECKPOINTS = os.path.join(BENCH, "checkpoints")
SMOKE_DIR_VARIABLE = "PRUNETUNE_BENCH_SMOKE_DIR"  # where a smoke run writes (default: a new temporary directory)
# The data of a smoke run: synthetic images, made in memory, nothing read from disk.
SMOKE_DATA = {"image_size": 16, "num_classes": 10, "train_size": 384, "test_size": 64}
_smoke_dir: str | None = None  # set by parse_args in smoke mode: every output goes there


def machine() -> dict:
    """Where the figures were measured."""
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "load_1_5_15_min": [round(v, 2) for v in os.getloadavg()]}  # uptime's load: other jobs on the CPUs
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def time_side_by_side(nets: dict, example, threads: int, rounds: int = 5) -> dict:
    """Median batch latency in ms of each named net, timed in interleaved rounds so all see the same machine (a
    smoke run: one round of 3 repeats, whose figures mean nothing)."""
    from prunetune.workers.timing import time_forward

    rounds, repeats = (1, 3) if _smoke_dir else (rounds, 30)
    timed = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            timed[name].append(time_forward(net, example, repeats=repeats, threads=threads).median_ms)
    return {name: median(times) for name, times in timed.items()}


def parse_args(parser: argparse.ArgumentParser, smoke: dict | None = None, require: tuple[str, ...] = ()):
    """Add `--smoke` to a bench script's parser and parse its arguments.

    With --smoke the `smoke` values become the defaults (options given on the command line still win), and
    every output (results, partial results, checkpoints, work files) goes to a temporary directory, never to
    bench/results or bench/checkpoints. Without it, the options named in `require` must be given."""
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run of the whole code path on tiny synthetic inputs; needs nothing outside "
                             f"the repository and writes only to a temporary directory (or ${SMOKE_DIR_VARIABLE})")
    args = parser.parse_args()
    if not args.smoke:
        for name in require:
            if getattr(args, name) is None:
                parser.error(f"--{name.replace('_', '-')} is required (or --smoke)")
        return args
    parser.set_defaults(**(smoke or {}))
    args = parser.parse_args()
    start_smoke()
    return args


def start_smoke() -> str:
    """Send this process's outputs to the smoke directory (created now) and return it."""
    global _smoke_dir
    _smoke_dir = os.environ.get(SMOKE_DIR_VARIABLE) or tempfile.mkdtemp(prefix="prunetune-bench-smoke-")
    os.makedirs(_smoke_dir, exist_ok=True)
    torch.set_num_threads(1)  # seconds on a small shared machine; a script's own thread setting comes after
    print(f"smoke run: tiny synthetic inputs, outputs in {_smoke_dir}", flush=True)
    return _smoke_dir


def smoke_dir() -> str | None:
    """The smoke run's output directory; None outside smoke mode."""
    return _smoke_dir


def results_path(name: str) -> str:
    """Where a result file NAME goes: bench/results/NAME, or the smoke directory in smoke mode."""
    folder = _smoke_dir or RESULTS
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def checkpoints_dir() -> str:
    """bench/checkpoints, or a folder of the smoke directory in smoke mode."""
    return os.path.join(_smoke_dir, "checkpoints") if _smoke_dir else CHECKPOINTS


def smoke_data(**overrides):
    """Tiny synthetic data (SMOKE_DATA, with overrides) for a smoke run."""
    from prunetune import load_data

    return load_data("synthetic", **{**SMOKE_DATA, **overrides})


def bench_net(spec: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """`NAME:SIZE` -> (a network with random weights, its input shape (3, SIZE, SIZE)): `resnet50` is
    tests/archs.py's torchvision-style ResNet-50, any other NAME a prunetune registry model; 1000 classes at
    224 px and above, 10 below."""
    from prunetune import build_model

    name, size = spec.split(":")
    classes = 1000 if int(size) >= 224 else 10
    if name == "resnet50":
        from tests.archs import resnet50

        return resnet50(classes), (3, int(size), int(size))
    return build_model(name, classes), (3, int(size), int(size))


def save(name: str, payload: dict) -> str:
    """Write results/NAME.json (with the machine description; the smoke directory in smoke mode) and return
    its path."""
    path = results_path(f"{name}.json")
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


CHECKPOINT = os.path.join(CHECKPOINTS, "resnet20-cifar10.pt")
# What --smoke changes in a CIFAR-10 study: a random digits_cnn (no checkpoint) on SMOKE_DATA, one thread.
CIFAR_SMOKE = {"checkpoint": None, "model": "digits_cnn", "threads": 1}


def cifar_arguments(parser) -> None:
    """The arguments of a study on the CIFAR-10 checkpoint: --data, --checkpoint, --model, --threads. Parse with
    parse_args(parser, {**CIFAR_SMOKE, ...}, require=("data",)): --data is needed except with --smoke."""
    parser.add_argument("--data", help="the CIFAR-10 image folder (train/, test/); not with --smoke")
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=os.cpu_count())


def cifar_model(args):
    """The CIFAR-10 data (decoded once into the prunetune cache) and the trained model, in eval mode; sets the
    torch threads. In smoke mode: SMOKE_DATA and the model with random weights, unless a checkpoint is given."""
    from prunetune import build_model, load_data
    from prunetune.workers.models import load_checkpoint

    torch.set_num_threads(args.threads)
    if getattr(args, "smoke", False):
        data = smoke_data()
        torch.manual_seed(0)
    else:
        data = load_data("imagefolder", path=args.data, cache_dir=os.path.expanduser("~/.cache/prunetune"))
    model = build_model(args.model, data.num_classes, 3)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return data, model.eval()
