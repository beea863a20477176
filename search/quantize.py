"""int8 after pruning: post-training static quantization of a final model, and fp32 vs int8 side by side.

The path is ONNX plus ONNX Runtime's static quantization (QDQ format, int8 weights per output channel, int8
activations), calibrated on the run's own calibration split: the images adaptive BN used. ONNX Runtime because
it runs the int8 model itself on the CPU, and because the ONNX export already carries the input contract (PyTorch's
PT2E flow was not tried). Both models are measured on the run's test split, read back as raw pixel values (what the
exported models take): test accuracy, size on disk, batch-1 latency with the configured threads. A model that loses
more than `max_drop` points of test accuracy is reported and not written.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from prunetune.workers.data import iterate_batches, load_data
from prunetune.workers.evaluator import evaluation_data
from prunetune.workers.files import atomic_write
from prunetune.workers.methods import METHODS

from .artifacts import load_pruned
from .config import ConfigError, loader_workers
from .export import _destination, record_export, write_onnx
from .prepare import data_kwargs
from .report import write_report
from .rundir import RunDir
from .runfiles import Int8, OnnxFigures, read_summary, summary_path
from .store import CandidateStore


def _session(path: str, threads: int | None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _raw_batches(data, contract: dict, size: int = 256):
    """The test split as raw pixel values (what the exported models take) and labels, batch by batch."""
    channels = len(contract["mean"])
    mean = torch.tensor(contract["mean"]).view(1, channels, 1, 1)
    std = torch.tensor(contract["std"]).view(1, channels, 1, 1)
    for x, y in iterate_batches(data.test, range(len(data.test)), size):
        yield ((x * std + mean) / contract["scale"]).numpy().astype(np.float32), y.numpy()


def _measure(path: str, data, contract: dict, threads: int | None, repeats: int) -> dict:
    """Test accuracy, size on disk and batch-1 latency (median over repeats) of an ONNX model."""
    import time

    session = _session(path, threads)
    correct = total = 0
    first = None
    for x, y in _raw_batches(data, contract):
        first = x[:1] if first is None else first
        correct += int((session.run(None, {"input": x})[0].argmax(1) == y).sum())
        total += len(y)
    for _ in range(5):
        session.run(None, {"input": first})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"input": first})
        times.append(1000 * (time.perf_counter() - start))
    return {"test_accuracy": correct / total, "size_mb": os.path.getsize(path) / 2 ** 20,
            "latency_ms_batch1": float(np.median(times))}


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over the run's calibration images (raw pixel values)."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self.batches = iter([{"input": images[i:i + batch].astype(np.float32)} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(output_dir: str, rank: int, destination: str | None, max_drop: float,
                  calibration_images: int = 512) -> tuple[str | None, dict]:
    """Quantize final model `rank` of a run to int8; return the written path (None if over the accuracy margin)
    and the fp32 vs int8 figures (also added to the run's summary and report.md)."""
    if not 0 <= max_drop <= 100:
        raise ConfigError(f"--max-accuracy-drop: {max_drop} is outside [0, 100] (points of test accuracy)")
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ConfigError("--quantize: int8 export needs onnx and onnxruntime (pip install 'prunetune[deploy]')") \
            from None
    run = RunDir(output_dir)
    source = os.path.join(run.final_path, f"rank{rank}.pt")
    if not os.path.isfile(source) or not os.path.isfile(summary_path(run.path)):
        raise ConfigError(f"--rank: {source} does not exist (has the run finished? see `prunetune report`)")
    path = _destination(run, source, rank, ".int8.onnx", destination)
    model, record, _ = load_pruned(source)
    if record.task != "classification":
        raise ConfigError(f"--quantize: int8 export measures test accuracy, so it is for classification runs only "
                          f"(this run's model.task is {record.task})")
    model = METHODS[record.granularity].deployable(model)
    contract = record.input
    if not contract:
        raise ConfigError("--quantize: the run's data has no input contract (a data factory), so its calibration "
                          "images cannot be given to the exported model as raw pixel values")
    cfg = run.load_config()
    data = load_data(**data_kwargs(cfg), num_workers=loader_workers(cfg))
    calibration = evaluation_data(data, cfg.evaluation.settings(), loader_workers(cfg)).calibration[:calibration_images]
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calibration)
    with tempfile.TemporaryDirectory(prefix="prunetune-int8-") as tmp:
        fp32, ready, int8 = (os.path.join(tmp, name) for name in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        write_onnx(model, record, fp32)
        quant_pre_process(fp32, ready, skip_symbolic_shape=True)
        quantize_static(ready, int8, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        figures = {"fp32": _measure(fp32, data, contract, cfg.latency.threads, cfg.latency.repeats),
                   "int8": _measure(int8, data, contract, cfg.latency.threads, cfg.latency.repeats)}
        drop = 100 * (figures["fp32"]["test_accuracy"] - figures["int8"]["test_accuracy"])
        written = drop <= max_drop
        if written:
            atomic_write(path, lambda t: shutil.copyfile(int8, t))
            record_export(run, path, "int8", rank)
    figures.update(accuracy_drop_points=drop, max_drop_points=max_drop, written=written,
                   path=path if written else None, calibration_images=len(calibration))
    summary = read_summary(run.path)
    if summary is not None:  # None only if it was removed meanwhile: then there is no report to add them to
        for entry in summary.final:
            if entry.rank == rank:
                entry.int8 = Int8(**figures["int8"], fp32=OnnxFigures(**figures["fp32"]), written=written,
                                  accuracy_drop_points=drop, path=figures["path"])
        write_report(run, summary, CandidateStore(run.path).records())
    return (path if written else None), figures


def figures_table(figures: dict) -> str:
    """fp32 vs int8 side by side, as printed by `prunetune export --quantize int8`."""
    lines = [f"{'model':<6} {'test acc':>9} {'size':>9} {'latency (batch 1)':>18}"]
    for name in ("fp32", "int8"):
        f = figures[name]
        lines.append(f"{name:<6} {100 * f['test_accuracy']:>8.2f}% {f['size_mb']:>6.2f} MB "
                     f"{f['latency_ms_batch1']:>15.3f} ms")
    verdict = (f"written to {figures['path']}" if figures["written"] else
               f"NOT written: int8 loses {figures['accuracy_drop_points']:.2f} points of test accuracy, more than "
               f"--max-accuracy-drop {figures['max_drop_points']:g}")
    lines.append(f"accuracy drop {figures['accuracy_drop_points']:+.2f} points; {verdict}")
    return "\n".join(lines)
