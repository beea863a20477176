"""`prunetune export --format ultralytics`: a pruned YOLO model of a `model.task: yolo` run as the checkpoint
Ultralytics writes and `ultralytics.YOLO(path)` loads.

An Ultralytics checkpoint is a torch.save'd dict whose "model" is the pickled network (a DetectionModel) and whose
"train_args" give the task, image size and data set (`ultralytics.nn.tasks.load_checkpoint` reads them; "ema" and
"optimizer" empty and "epoch" -1 mark a finished model, as Ultralytics' strip_optimizer leaves it). The network is
the pruned one itself, in float32, its class names those of the run's data; every block whose `c` is half its
`cv1`'s output (C2f, C3k2, ...: the `split((c, c))` Ultralytics' ONNX export uses instead of `chunk(2)`) gets the
pruned half. Ultralytics' `.train()` rebuilds the network from its YAML (the unpruned widths) and copies the weights
that fit; `prunetune.yolo.PrunedDetectionTrainer` trains the loaded network itself.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from prunetune.workers.logs import warn
from prunetune.workers.models import build_model

from .config import ConfigError
from .runfiles import ModelRecord

ULTRALYTICS_LICENSE = "AGPL-3.0 License (https://ultralytics.com/license)"  # what Ultralytics' own checkpoints say


def check_ultralytics(record: ModelRecord) -> None:
    """Refuse, in one line, a model that is not a YOLO detector (model.task yolo)."""
    if record.task != "yolo":
        raise ConfigError(f"--format: ultralytics writes a model.task yolo run's detector (an Ultralytics model) as "
                          f"an Ultralytics checkpoint; this run's task is {record.task}: allowed formats pt, "
                          "torchscript, onnx")


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The conv of an Ultralytics Conv block (or the conv itself)."""
    conv = getattr(module, "conv", module)
    return conv if isinstance(conv, nn.Conv2d) else None


def split_halves(base: nn.Module, pruned: nn.Module) -> None:
    """Set `c` of every block of `pruned` whose base `c` is half its cv1's output to half the pruned output."""
    blocks = dict(pruned.named_modules())
    for name, module in base.named_modules():
        conv = _conv_of(module.cv1) if isinstance(getattr(module, "cv1", None), nn.Module) else None
        if conv is None or not isinstance(getattr(module, "c", None), int) or 2 * module.c != conv.out_channels:
            continue
        pruned_conv = _conv_of(blocks[name].cv1)
        assert pruned_conv is not None  # pruning keeps the module tree
        blocks[name].c = pruned_conv.out_channels // 2


def ultralytics_checkpoint(model: nn.Module, record: ModelRecord, data_yaml: str | None) -> dict:
    """The checkpoint dict of the pruned network `model` (bare: input 0..1, as Ultralytics feeds it)."""
    spec = record.model
    split_halves(build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["kwargs"]), model)
    if not type(model).__module__.startswith("ultralytics."):
        warn(f"export: the model is a {type(model).__module__}.{type(model).__name__}, not an Ultralytics model "
             "(ultralytics.nn.tasks.DetectionModel): YOLO(path) reads only Ultralytics' own")
    classes = (record.input or {}).get("classes")
    if classes:
        model.names = dict(enumerate(classes))
    train_args = {"task": getattr(model, "task", "detect"), "imgsz": record.input_shape[-1]}
    if data_yaml:
        train_args["data"] = data_yaml
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": _ultralytics_version(), "license":
            ULTRALYTICS_LICENSE, "docs": "https://docs.ultralytics.com", "epoch": -1, "best_fitness": None,
            "model": model.float().eval(), "ema": None, "updates": None, "optimizer": None, "train_args": train_args,
            "prunetune": record.to_json()}


def _ultralytics_version() -> str | None:
    """The installed Ultralytics' version (None: not installed here)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ultralytics")
    except PackageNotFoundError:
        return None


def write_ultralytics(model: nn.Module, record: ModelRecord, data_yaml: str | None, path: str) -> None:
    """torch.save the checkpoint of `model` to `path`."""
    torch.save(ultralytics_checkpoint(model, record, data_yaml), path)
