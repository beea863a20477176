"""CandidateEvaluator: prune, recalibrate BN and score many candidates with everything loaded once."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from .adaptive_bn import recalibrate_bn
from .data import DataBundle, TensorImages, iterate_batches, join_targets
from .errors import RunFailed
from .methods import METHODS, PruningMethod
from .latency import device_name
from .progress import Progress
from .record import CandidateRecord
from .scoring import precision, score
from .settings import EvaluationSettings
from .space import PruningSpace
from .splits import splits_of
from .tasks import CLASSIFICATION, Task, search_score


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc
    _LIBC = None


class CandidateError(RunFailed, RuntimeError):
    """A candidate whose evaluation failed (e.g. NaN loss); recorded as failed, the search goes on."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EvaluationData:
    """The calibration batches and the held-out split of a search, compact: raw images (uint8 where the data set
    holds them) and the normalisation each batch gets on the device. Built once, by the driver, and shared
    read-only by the evaluators (through Ray's object store: one copy per node, not one per worker)."""

    calibration: np.ndarray  # [calibration_batches * batch_size, C, H, W], in calibration order
    heldout_x: np.ndarray
    heldout_y: np.ndarray | list  # the targets: an array (labels, masks), or a list of any (box lists)
    scale: float  # a batch is (x * scale - mean) / std per channel; identity for data that is already float
    mean: np.ndarray
    std: np.ndarray
    heldout_indices: np.ndarray  # indices into the training split
    rest_indices: np.ndarray  # the training split less the held-out and validation images (calibration, fine-tuning)
    calibration_indices: np.ndarray  # the calibration images' indices into the training split
    validation_indices: np.ndarray  # the finalists' validation split (workers/splits.py)

    @property
    def nbytes(self) -> int:
        """Memory the images and labels take."""
        targets = self.heldout_y.nbytes if isinstance(self.heldout_y, np.ndarray) else 0
        return self.calibration.nbytes + self.heldout_x.nbytes + targets


def evaluation_data(data: DataBundle, settings: EvaluationSettings, num_workers: int = 0) -> EvaluationData:
    """The EvaluationData of `data` for the evaluation settings (split sizes and seed, calibration batches); images
    not held in memory are read by `num_workers` processes (0: this one)."""
    splits = splits_of(len(data.train), settings)
    heldout, rest = splits.heldout, splits.rest
    order = np.random.default_rng([settings.seed, 11]).permutation(rest)
    # wraps round a small training split
    calibration = np.resize(order, settings.calibration_batches * settings.batch_size)
    train = data.train
    if isinstance(train, TensorImages):  # raw uint8 images: normalised per batch on the device
        labels = train.labels[torch.as_tensor(heldout)].numpy()
        return EvaluationData(train.images[torch.as_tensor(calibration)].numpy(),
                              train.images[torch.as_tensor(heldout)].numpy(), labels, float(train.scale),
                              train.mean.flatten().numpy(), train.std.flatten().numpy(), heldout, rest, calibration,
                              splits.validation)
    # batches of 64: several for the workers to share even with a few hundred images (the values are per image)
    progress = Progress("data: decoding calibration and held-out images", len(calibration) + len(heldout))

    def read(indices) -> Iterator[tuple[torch.Tensor, object]]:
        for x, y in iterate_batches(train, indices, 64, num_workers):
            progress.advance(len(x))
            yield x, y

    calibration_x = torch.cat([x for x, _ in read(calibration)]).float().numpy()
    xs, ys = zip(*read(heldout))
    progress.done()
    channels = calibration_x.shape[1]
    return EvaluationData(calibration_x, torch.cat(xs).float().numpy(), join_targets(ys), 1.0,
                          np.zeros(channels, np.float32), np.ones(channels, np.float32), heldout, rest, calibration,
                          splits.validation)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array that may be read-only shared memory (Ray's object store); it is never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def trim_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: a worker would grow with every candidate)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class CandidateEvaluator:
    """Evaluates strategies against one base model; keep one per worker for many candidates.

    Holds the base model, the prune plan (filter rankings), and the calibration batches and held-out split as
    compact raw images (on the GPU when there is one), normalised batch by batch in the compute dtype
    (channels_last on CUDA). Nothing is reloaded per candidate, and the worker's memory stays flat.
    """

    def __init__(self, model: nn.Module, space: PruningSpace, data: DataBundle | EvaluationData,
                 settings: EvaluationSettings, device: str = "auto", criterion: str = "l1",
                 method: PruningMethod = METHODS["channel"], task: Task = CLASSIFICATION):
        self.settings, self.space, self.task = settings, space, task
        self.device = resolve_device(device)
        self.autocast, self.channels_last = precision(settings, self.device)
        self.base = model.to(self.device).eval()
        self.device_name = device_name(self.device) if space.latency is not None else None  # latency timing
        self.plan = method.plan(self.base, space, criterion, settings.seed)
        data = data if isinstance(data, EvaluationData) else evaluation_data(data, settings)
        self.heldout_indices, self.rest_indices = data.heldout_indices, data.rest_indices
        self.calibration_indices, self.validation_indices = data.calibration_indices, data.validation_indices
        self.calibration, self.heldout_x = self._stage(data.calibration), self._stage(data.heldout_x)
        self.heldout_y = _tensor(data.heldout_y).to(self.device) if isinstance(data.heldout_y, np.ndarray) \
            else data.heldout_y
        shape = (1, -1) + (1,) * (data.calibration.ndim - 2)
        self.scale = data.scale
        self.mean = torch.as_tensor(data.mean, dtype=torch.float32).view(shape).to(self.device)
        self.std = torch.as_tensor(data.std, dtype=torch.float32).view(shape).to(self.device)

    def _stage(self, array: np.ndarray) -> torch.Tensor:
        """Raw inputs on the device once (pinned host memory if they do not fit); on the CPU they stay shared."""
        x = _tensor(array)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return x.pin_memory() if x.numel() * x.element_size() > 0.4 * free else x.to(self.device)
        return x

    def _batches(self, x: torch.Tensor, size: int):
        """Normalised batches of staged raw inputs, in the compute dtype and memory format."""
        for start in range(0, len(x), size):
            batch = (x[start:start + size].to(self.device, non_blocking=True).float() * self.scale - self.mean) \
                / self.std
            if self.autocast is not None:
                batch = batch.to(self.autocast)
            if self.channels_last and batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield batch

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def prune(self, ratios) -> nn.Module:
        """The pruned network for `ratios` (on the evaluator's device)."""
        model = self.plan.apply(ratios)
        if self.channels_last:  # Module.to takes a memory format too; torch's overloads leave it out
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    def recalibrate(self, model: nn.Module) -> int:
        """Adaptive BN on the calibration batches (the configured mode); the batches used (0: nothing to do)."""
        return recalibrate_bn(model, self._batches(self.calibration, self.settings.batch_size), self.settings.bn_mode,
                              self.autocast, self.settings.calibration_tolerance)

    def evaluate(self, ratios, index: int = 0) -> CandidateRecord:
        """Prune, recalibrate and score one strategy (candidate `index`); raises CandidateError on a NaN loss."""
        ratios = self.space.check(ratios)
        t0 = self._sync()
        model = self.prune(ratios)
        t1 = self._sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recalibrated = self.recalibrate(model)
        t2 = self._sync()
        size = self.settings.score_batch_size
        targets = (self.heldout_y[start:start + size] for start in range(0, len(self.heldout_y), size))
        result = score(model, zip(self._batches(self.heldout_x, size), targets), self.autocast, self.task)
        t3 = self._sync()
        bad = next((name for name in self.task.metrics if not math.isfinite(result[name])), None)  # loss among them
        if bad:
            raise CandidateError(f"held-out {bad} is {result[bad]} (diverged network)")
        latency = self.latency(model, ratios)
        del model
        trim_memory()
        flops = self.space.flops(ratios)
        return CandidateRecord(
            index, [float(r) for r in ratios], kept_units=self.space.kept_units(ratios), flops=flops,
            flops_ratio=flops / self.space.base_flops, params=self.space.params(ratios),
            score=search_score(self.task, result, self.settings.metric), accuracy=result.get("accuracy"),
            metrics={name: result[name] for name in self.task.metrics}, loss=result.get("loss"),
            bn_recalibrated=recalibrated > 0,
            calibration_batches=recalibrated,
            warning="; ".join(str(w.message) for w in caught) or None, t_prune=t1 - t0, t_calibrate=t2 - t1,
            t_score=t3 - t2, device=str(self.device), **latency)

    def latency(self, model: nn.Module, ratios: np.ndarray) -> dict:
        """The latency table's prediction for the strategy and, on the table's device, the pruned net timed."""
        table = self.space.latency
        if table is None:
            return {}
        kept = self.space.kept_batch(ratios[None, :])
        found = {"latency_predicted_ms": float(table.predict(self.space, kept)[0])}
        if self.device_name == table.device:
            found["latency_ms"] = table.time(model.float().to(memory_format=torch.contiguous_format), self.device,
                                             self.space.input_shape).median_ms
        return found

    def time_base(self) -> float:
        """The base model timed now as the latency table times (milliseconds): how fast the machine is now."""
        table = self.space.latency
        assert table is not None, "time_base needs the space's latency table"
        return table.time(self.base, self.device, self.space.input_shape).median_ms
