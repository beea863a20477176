"""CandidateEvaluator: prune, recalibrate BN and score many candidates with everything loaded once."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

from .adaptive_bn import recalibrate_bn
from .data import DataBundle, heldout_split, iterate_batches
from .granularity import GRANULARITIES
from .record import CandidateRecord
from .scoring import score
from .space import PruningSpace


class CandidateError(RuntimeError):
    """A candidate whose evaluation failed (e.g. NaN loss); recorded as failed, the search goes on."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CandidateEvaluator:
    """Evaluates strategies against one base model; keep one per worker for many candidates.

    Holds the base model, the prune plan (filter rankings), the calibration batches and the held-out split
    already on the device (in the compute dtype, channels_last on CUDA). Nothing is reloaded per candidate.
    """

    def __init__(self, model: nn.Module, space: PruningSpace, data: DataBundle, evaluation_config,
                 device: str = "auto", criterion: str = "l1", granularity: str = "channel"):
        cfg = evaluation_config
        self.cfg, self.space = cfg, space
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        self.autocast = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)) else None
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        self.base = model.to(self.device).eval()
        self.plan = GRANULARITIES[granularity].pruner(self.base, space, criterion, cfg.seed)
        heldout, rest = heldout_split(len(data.train), cfg.heldout_size, cfg.seed)
        self.heldout_indices, self.rest_indices = heldout, rest
        needed = cfg.calibration_batches * cfg.batch_size
        order = np.random.default_rng([cfg.seed, 11]).permutation(rest)
        self.calibration_indices = np.resize(order, needed)  # wraps around when the training split is small
        self.calibration = self._stage(torch.cat([x for x, _ in
                                                  iterate_batches(data.train, self.calibration_indices, 512)]))
        xs, ys = zip(*iterate_batches(data.train, heldout, 512))
        self.heldout_x, self.heldout_y = self._stage(torch.cat(xs)), torch.cat(ys).to(self.device)

    def _stage(self, x: torch.Tensor) -> torch.Tensor:
        """Move preprocessed inputs to the device once (pinned host memory if they do not fit)."""
        dtype = self.autocast or torch.float32
        x = x.to(dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if x.numel() * x.element_size() > 0.4 * free:
                return x.pin_memory()
        return x.to(self.device)

    def _batches(self, x: torch.Tensor, size: int):
        for start in range(0, len(x), size):
            yield x[start:start + size].to(self.device, non_blocking=True)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def prune(self, ratios) -> nn.Module:
        """The pruned network for `ratios` (on the evaluator's device)."""
        model = self.plan.apply(ratios)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def recalibrate(self, model: nn.Module) -> bool:
        """Adaptive BN on the calibration batches (the configured mode); False if nothing was recalibrated."""
        return recalibrate_bn(model, self._batches(self.calibration, self.cfg.batch_size), self.cfg.bn_mode,
                              self.autocast)

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
        heldout = zip(self._batches(self.heldout_x, self.cfg.score_batch_size),
                      self.heldout_y.split(self.cfg.score_batch_size))
        result = score(model, heldout, self.autocast)
        t3 = self._sync()
        if not math.isfinite(result["loss"]):
            raise CandidateError(f"held-out loss is {result['loss']} (diverged network)")
        flops = self.space.flops(ratios)
        return CandidateRecord(
            index, [float(r) for r in ratios], kept_channels=self.space.kept_channels(ratios), flops=flops,
            flops_ratio=flops / self.space.base_flops, params=self.space.params(ratios),
            score=result["accuracy"] if self.cfg.metric == "accuracy" else -result["loss"],
            accuracy=result["accuracy"], loss=result["loss"], bn_recalibrated=recalibrated,
            warning="; ".join(str(w.message) for w in caught) or None, t_prune=t1 - t0, t_calibrate=t2 - t1,
            t_score=t3 - t2, device=str(self.device))
