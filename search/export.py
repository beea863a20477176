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
import time

import torch

from prunetune.workers.files import atomic_write, write_json
from prunetune.workers.methods import METHODS

from .artifacts import load_pruned
from .config import ConfigError
from .rundir import RunDir
from .store import sha256

EXPORTS = "exports.json"  # in the run directory: what `prunetune export` of the run wrote (not the run's own files)


def _exports(run: RunDir) -> dict:
    """The run's export record: path (relative to the run directory) -> run_id, sha256, format, rank."""
    try:
        with open(os.path.join(run.path, EXPORTS)) as f:
            exports = json.load(f)
    except (OSError, ValueError):
        return {}
    return exports if isinstance(exports, dict) else {}


def _key(run: RunDir, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), run.path)


def _written_by_export(run: RunDir, path: str) -> bool:
    """True if `path` is a file an earlier `prunetune export` of this very run (same run_id) wrote, unchanged since."""
    entry = _exports(run).get(_key(run, path))
    run_id = run.manifest().get("run_id")
    return (isinstance(entry, dict) and run_id is not None and entry.get("run_id") == run_id
            and os.path.isfile(path) and entry.get("sha256") == sha256(path))


def record_export(run: RunDir, path: str, fmt: str, rank: int) -> None:
    """Add a file just written by an export to the run's export record (atomic rewrite of exports.json)."""
    exports = _exports(run)
    exports[_key(run, path)] = {"run_id": run.manifest().get("run_id"), "sha256": sha256(path), "format": fmt,
                                "rank": rank, "written": time.time()}
    write_json(os.path.join(run.path, EXPORTS), exports, durable=True)


def _destination(run: RunDir, source: str, rank: int, suffix: str, to: str | None) -> str:
    """Where the export goes: next to the model by default; into `to` if it is a directory; else `to` itself.
    An existing file there is refused unless an earlier export of this run wrote it (and it is unchanged): an
    export never overwrites a file it did not write."""
    option = "export" if to is None else "--to"
    if to is None:
        path = os.path.join(os.path.dirname(source), f"rank{rank}{suffix}")
    else:
        path = os.path.join(to, f"rank{rank}{suffix}") if os.path.isdir(to) else to
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"--to: directory {parent} does not exist")
    if os.path.lexists(path) and not _written_by_export(run, path):
        what = "pass --to another name" if to is None else "choose another name"
        raise ConfigError(f"{option}: {path} already exists; prunetune does not overwrite it (it is not an export "
                          f"of this run: {what}, or remove it)")
    return path


def export(output_dir: str, rank: int, fmt: str, destination: str | None = None) -> str:
    """Write final model `rank` of the run in `fmt`; return the written path."""
    run = RunDir(output_dir)
    source = os.path.join(run.final_path, f"rank{rank}.pt")
    if not os.path.isfile(source):
        raise ConfigError(f"--rank: {source} does not exist (has the run finished? see `prunetune report`)")
    suffix = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}[fmt]
    if fmt == "pt" and destination is None:
        return source  # the run's own model: nothing to write
    path = _destination(run, source, rank, suffix, destination)
    if fmt == "pt":
        atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
        record_export(run, path, fmt, rank)
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
    else:
        atomic_write(path, lambda tmp: write_onnx(model, record, tmp))
    record_export(run, path, fmt, rank)
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
