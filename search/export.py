"""Export a final model of a run as a state dict + record (pt), TorchScript, or ONNX.

An unstructured run's masks are made permanent first (`torch.nn.utils.prune.remove`: zeros in dense
tensors; its `rankN.pt` itself stores them compactly, as a bit mask plus the non-zero values).
TorchScript and ONNX models start with the input contract's preprocessing: they take raw pixel values
(0..255, or 0..16 for digits) as floats, and carry the contract (shape, scale, mean, std, class names) as
metadata: `prunetune.json` in the TorchScript file's extra files, the `prunetune` property of the ONNX model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch

from prunetune.workers.files import atomic_write
from prunetune.workers.methods import METHODS

from .artifacts import load_pruned
from .config import ConfigError
from .rundir import RunDir


def _destination(source: str, rank: int, suffix: str, to: str | None) -> str:
    """Where the export goes: next to the model by default; into `to` if it is a directory; else `to` itself,
    which must not exist yet (an export never overwrites a file it did not write)."""
    if to is None:
        return os.path.join(os.path.dirname(source), f"rank{rank}{suffix}")
    path = os.path.join(to, f"rank{rank}{suffix}") if os.path.isdir(to) else to
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--to: directory {parent} does not exist")
    if os.path.exists(path):
        raise ConfigError(f"--to: {path} already exists; prunetune does not overwrite it (choose another name)")
    return path


def export(output_dir: str, rank: int, fmt: str, destination: str | None = None) -> str:
    """Write final model `rank` of the run in `fmt`; return the written path."""
    source = os.path.join(RunDir(output_dir).final_path, f"rank{rank}.pt")
    if not os.path.isfile(source):
        raise ConfigError(f"--rank: {source} does not exist (has the run finished? see `prunetune report`)")
    suffix = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}[fmt]
    path = _destination(source, rank, suffix, destination)
    if fmt == "pt":
        if os.path.abspath(path) != os.path.abspath(source):
            atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
        return path
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format: onnx export needs the onnx package (pip install 'prunetune[onnx]')")
    model, record, _ = load_pruned(source)  # with the input contract's preprocessing: raw pixel values in
    model = METHODS[record["granularity"]].deployable(model)  # e.g. masks made permanent: zeros, no mask at run time
    if fmt == "torchscript":
        with torch.no_grad():
            scripted = torch.jit.trace(model, torch.zeros(1, *record["input_shape"]))
        metadata = json.dumps(record)  # with record["input"], the input contract
        atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files={"prunetune.json": metadata}))
        return path

    atomic_write(path, lambda tmp: write_onnx(model, record, tmp))
    return path


def write_onnx(model: torch.nn.Module, record: dict, path: str) -> None:
    """Write `model` (raw pixel values in, logits out, any batch size) as ONNX carrying `record` as metadata."""
    import onnx

    example = torch.zeros(1, *record["input_shape"])
    torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"prunetune": json.dumps(record)})
    onnx.save(proto, path)
