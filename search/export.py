"""Export a final model of a run as a state dict + record (pt), TorchScript, or ONNX."""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from .artifacts import load_pruned
from .config import ConfigError
from .rundir import RunDir


def export(output_dir: str, rank: int, fmt: str, destination: str | None = None) -> str:
    """Write final model `rank` of the run in `fmt`; return the written path."""
    source = os.path.join(RunDir(output_dir).final_path, f"rank{rank}.pt")
    if not os.path.isfile(source):
        raise ConfigError(f"--rank: {source} does not exist (has the run finished? see `prunetune report`)")
    suffix = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}[fmt]
    destination = destination or os.path.join(os.path.dirname(source), f"rank{rank}{suffix}")
    if fmt == "pt":
        if os.path.abspath(destination) != os.path.abspath(source):
            shutil.copyfile(source, destination)
        return destination
    model, record, _ = load_pruned(source)
    example = torch.zeros(1, *record["input_shape"])
    if fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(model, example).save(destination)
        return destination
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format: onnx export needs the onnx package (pip install 'prunetune[onnx]')")
    torch.onnx.export(model, (example,), destination, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return destination
