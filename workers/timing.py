"""Honest forward timing: the one helper every latency figure uses (the report, the look-up table, the trials).

Warm-up passes first (allocator, lazy kernels, cuDNN choices), the CUDA device synchronised around every pass,
a fixed thread count on the CPU for the duration, and the median over repeats with its interquartile range. A
figure whose spread is large next to its median is marked unstable (a busy machine), not passed off as a fact.

A figure is timed in a runtime (`RUNTIMES`): eager PyTorch, or ONNX Runtime or OpenVINO on the CPU, where the model
is exported to ONNX once (its compiled session kept while the model object lives) and run as a deployment would run
it (fp32).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

UNSTABLE_SPREAD = 0.25  # an interquartile range above this fraction of the median marks the figure unstable
ROUNDS = 5  # interleaved rounds of every timing: a spike lands in one round of each figure, not on one figure


@dataclass(frozen=True)
class Timing:
    """Median forward latency in milliseconds, its interquartile range, and how many passes were timed."""

    median_ms: float
    iqr_ms: float
    repeats: int

    @property
    def stable(self) -> bool:
        """False when the spread says the machine was too busy for the median to be trusted."""
        return self.iqr_ms <= UNSTABLE_SPREAD * self.median_ms


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """Run the block with `threads` intra-op CPU threads (None: leave the setting alone)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_call(model: nn.Module, example: torch.Tensor, threads: int | None) -> Callable[[], object]:
    return lambda: model(example)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(runtime, shape, threads): run}


def _exported_call(compile: Callable[[bytes, int | None], Callable[[np.ndarray], object]], runtime: str):
    """A runtime's call: the model exported to ONNX once per input shape and threads, compiled by `compile(graph,
    threads)` into a function of the input array, and kept while the model object lives."""
    def call(model: nn.Module, example: torch.Tensor, threads: int | None) -> Callable[[], object]:
        compiled = _SESSIONS.setdefault(model, {})
        key = (runtime, tuple(example.shape), threads)
        if key not in compiled:
            graph = io.BytesIO()
            # the exporter (dynamo=False) writes to a file object too; torch's annotation names only paths
            torch.onnx.export(model, (example.cpu(),), graph, input_names=["input"],  # type: ignore[arg-type]
                              dynamo=False)
            compiled[key] = compile(graph.getvalue(), threads)
        run, array = compiled[key], example.detach().cpu().numpy()
        return lambda: run(array)
    return call


def _onnxruntime_session(graph: bytes, threads: int | None) -> Callable[[np.ndarray], object]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return lambda array: session.run(None, {"input": array})


def _openvino_request(graph: bytes, threads: int | None) -> Callable[[np.ndarray], object]:
    import openvino

    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",  # fp32 as exported, never bf16
              "ENABLE_CPU_PINNING": False,  # pinned to a core other jobs share, a pass waits for that core
              **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
    request = core.compile_model(core.read_model(graph), "CPU", config).create_infer_request()
    return lambda array: request.infer({0: array})


def _version(package: str) -> Callable[[], str]:
    """The installed version of `package` (imported when asked: the cache key of a table timed in it)."""
    return lambda: importlib.import_module(package).__version__


@dataclass(frozen=True)
class Runtime:
    """Where a figure is timed: `call(model, example, threads)` gives one forward pass to time; its version."""

    name: str
    call: Callable[[nn.Module, torch.Tensor, int | None], Callable[[], object]]
    version: Callable[[], str]
    title: str  # how the report names it
    cpu_only: bool = False
    package: str | None = None  # what to install when it does not import
    # its kernels run channels in blocks of this: other counts take slower, unpredictable paths (ONNX Runtime's
    # blocked NCHWc convolutions, OpenVINO's): search.round_to's default for a latency budget timed in it
    channel_block: int = 1


RUNTIMES = {
    "torch": Runtime("torch", _torch_call, lambda: torch.__version__, "PyTorch"),
    "onnxruntime": Runtime("onnxruntime", _exported_call(_onnxruntime_session, "onnxruntime"),
                           _version("onnxruntime"), "ONNX Runtime", cpu_only=True,
                           package="onnxruntime (pip install 'prunetune[deploy]')", channel_block=8),
    "openvino": Runtime("openvino", _exported_call(_openvino_request, "openvino"), _version("openvino"), "OpenVINO",
                        cpu_only=True, package="openvino (pip install 'prunetune[openvino]')", channel_block=8),
}


def time_forward(model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5,
                 threads: int | None = None, runtime: str = "torch") -> Timing:
    """Time `model(example)` in eval mode without gradients, in `runtime` on the device of `example`."""
    cuda = example.device.type == "cuda"
    was_training = model.training
    model.eval()
    times = []
    try:
        with cpu_threads(None if cuda else threads), torch.no_grad():
            forward = RUNTIMES[runtime].call(model, example, threads)
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(example.device)
                start = time.perf_counter()
                forward()
                if cuda:
                    torch.cuda.synchronize(example.device)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - start))
    finally:
        model.train(was_training)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Timing(float(median), float(q3 - q1), repeats)


def interleaved(runs: list[tuple[nn.Module, torch.Tensor]], repeats: int, threads: int | None = None,
                runtime: str = "torch") -> list[Timing]:
    """Time each (model, input) in `runtime` in ROUNDS interleaved rounds (each round times every one of them
    repeats / ROUNDS passes after one warm-up pass), so that a load spike lands on all of them alike: per run, the
    median of its rounds' medians and of their interquartile ranges."""
    per_round = max(1, -(-repeats // ROUNDS))
    rounds = [[time_forward(model, x, per_round, 1, threads, runtime) for model, x in runs] for _ in range(ROUNDS)]
    return [Timing(float(np.median([r[i].median_ms for r in rounds])), float(np.median([r[i].iqr_ms for r in rounds])),
                   per_round * ROUNDS) for i in range(len(runs))]
