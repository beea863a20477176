"""Export a final model of a run as a state dict + record (pt), TorchScript, ONNX, or an Ultralytics checkpoint.

An unstructured run's masks are made permanent first (`torch.nn.utils.prune.remove`: zeros in dense
tensors; its `rankN.pt` itself stores them compactly, as a bit mask plus the non-zero values).
TorchScript and ONNX models start with the input contract's preprocessing: they take raw pixel values
(0..255, or 0..16 for digits) as floats, return the prediction the run's task scores (model.task: the logits of a
classifier, per-pixel logits of a segmenter, the first of (logits, aux), `out` of a dict), and carry the contract
(shape, scale, mean, std, class names) and the task as metadata: `prunetune.json` in the TorchScript file's extra
files, the `prunetune` property of the ONNX model. The Ultralytics checkpoint (a model.task yolo run's) holds the bare
pruned network, which takes values 0..1 as Ultralytics feeds them (ultralytics_export.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import torch

from prunetune.workers.files import atomic_write, write_text
from prunetune.workers.methods import METHODS
from prunetune.workers.models import read_weights
from prunetune.workers.tasks import Task, resolve_task

from .artifacts import load_pruned
from .config import ConfigError
from .prepare import data_kwargs
from .rundir import RunDir
from .runfiles import Export, ModelRecord, read_exports, read_model_file, write
from .store import sha256
from .ultralytics_export import check_ultralytics, write_ultralytics


class Prediction(torch.nn.Module):
    """A network that returns only the output its task scores (the model's other outputs, e.g. aux, dropped)."""

    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model, self.select = model, task.select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.select(self.model(x))


def _key(run: RunDir, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), run.path)


def _written_by_export(run: RunDir, path: str) -> bool:
    """True if `path` is a file an earlier `prunetune export` of this very run (same run_id) wrote, unchanged since."""
    entry = read_exports(run.path).files.get(_key(run, path))
    run_id = run.manifest().run_id
    return (entry is not None and bool(run_id) and entry.run_id == run_id
            and os.path.isfile(path) and entry.sha256 == sha256(path))


def record_export(run: RunDir, path: str, fmt: str, rank: int) -> None:
    """Add a file just written by an export to the run's export record (an atomic rewrite)."""
    exports = read_exports(run.path)
    exports.files[_key(run, path)] = Export(run_id=run.manifest().run_id or None, sha256=sha256(path), format=fmt,
                                            rank=rank, written=time.time())
    write(run.path, exports)


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
    suffix = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx", "ultralytics": ".ultralytics.pt"}[fmt]
    if fmt == "pt" and destination is None:
        return source  # the run's own model: nothing to write
    if fmt == "ultralytics":
        check_ultralytics(read_model_file(read_weights(source, "model file"), source)[0])
    path = _destination(run, source, rank, suffix, destination)
    if fmt == "pt":
        atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
        record_export(run, path, fmt, rank)
        return path
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format: onnx export needs the onnx package (pip install 'prunetune[onnx]')")
    # Ultralytics feeds values 0..1: its checkpoint holds the bare network; the others start with the input
    # contract's preprocessing, so they take raw pixel values
    model, record, _ = load_pruned(source, raw_input=fmt != "ultralytics")
    model = METHODS[record.granularity].deployable(model)  # e.g. masks made permanent: zeros, no mask at run time
    if fmt == "ultralytics":
        data = run.load_config().data
        data_yaml = os.path.abspath(data.path) if data.name == "yolo" and os.path.isfile(data.path) else None
        atomic_write(path, lambda tmp: write_ultralytics(model, record, data_yaml, tmp))
    elif fmt == "torchscript":
        model = Prediction(model, resolve_task(record.task)).eval()
        with torch.no_grad():
            scripted = torch.jit.trace(model, torch.zeros(1, *record.input_shape))
        metadata = json.dumps(record.to_json())  # with record.input, the input contract
        atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files={"prunetune.json": metadata}))
    else:
        atomic_write(path, lambda tmp: write_onnx(Prediction(model, resolve_task(record.task)).eval(), record, tmp))
    record_export(run, path, fmt, rank)
    return path


def write_onnx(model: torch.nn.Module, record: ModelRecord, path: str) -> None:
    """Write `model` (raw pixel values in, its task's prediction out as `logits`, any batch size) as ONNX carrying
    `record` as metadata."""
    import onnx

    example = torch.zeros(1, *record.input_shape)
    torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"prunetune": json.dumps(record.to_json())})
    onnx.save(proto, path)


def export_test_split(output_dir: str, destination: str) -> str:
    """Write the run's test split into the new (or empty) directory `destination` as `<class>/<n>.png` holding the
    raw pixel values the models take (0..255, 0..16 for digits; an image folder's own files are copied), with
    `labels.csv` (file, label, class) in the split's order; return a one-line account."""
    from prunetune.workers.data import LazyImageFolder, TensorImages, load_data

    cfg = RunDir(output_dir).load_config()
    if os.path.lexists(destination) and not (os.path.isdir(destination) and not os.listdir(destination)):
        raise ConfigError(f"--test-split: {destination} already exists and is not an empty directory; prunetune writes "
                          "the test split only into a new or empty one")
    parent = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(parent):
        raise ConfigError(f"--test-split: directory {parent} does not exist")
    data = load_data(**data_kwargs(cfg))
    test = data.test
    if not isinstance(test, (TensorImages, LazyImageFolder)):
        raise ConfigError(f"--test-split: data.name {cfg.data.name} has no test images to write (synthetic data, "
                          "or a factory's: its test split is whatever the factory returns)")
    classes = list(data.contract.classes) if data.contract else [str(c) for c in range(data.num_classes)]
    rows = ["file,label,class"]
    for cls in classes:
        os.makedirs(os.path.join(destination, cls), exist_ok=True)
    for i in range(len(test)):
        label = int(test.labels[i])
        if isinstance(test, TensorImages):
            name = os.path.join(classes[label], f"{i:05d}.png")
            _write_png(test.images[i], os.path.join(destination, name))
        else:
            name = os.path.join(classes[label], f"{i:05d}-{os.path.basename(test.files[i])}")
            shutil.copyfile(test.files[i], os.path.join(destination, name))
        rows.append(f"{name},{label},{classes[label]}")
    write_text(os.path.join(destination, "labels.csv"), "\n".join(rows) + "\n")
    return f"{len(test)} test images of {cfg.data.name} written to {destination} (labels in labels.csv)"


def _write_png(image: torch.Tensor, path: str) -> None:
    """A uint8 [C, H, W] image as a lossless PNG (grey for one channel, RGB for three)."""
    from PIL import Image

    pixels = image.numpy()
    Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(path)
