"""Honest forward timing: the one helper every latency figure uses (the report, the look-up table, the trials).

Warm-up passes first (allocator, lazy kernels, cuDNN choices), the CUDA device synchronised around every pass,
a fixed thread count on the CPU for the duration, and the median over repeats with its interquartile range. A
figure whose spread is large next to its median is marked unstable (a busy machine), not passed off as a fact.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

UNSTABLE_SPREAD = 0.25  # an interquartile range above this fraction of the median marks the figure unstable


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


def time_forward(model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5,
                 threads: int | None = None) -> Timing:
    """Time `model(example)` in eval mode without gradients, on the device of `example`."""
    cuda = example.device.type == "cuda"
    was_training = model.training
    model.eval()
    times = []
    try:
        with cpu_threads(None if cuda else threads), torch.no_grad():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(example.device)
                start = time.perf_counter()
                model(example)
                if cuda:
                    torch.cuda.synchronize(example.device)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - start))
    finally:
        model.train(was_training)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Timing(float(median), float(q3 - q1), repeats)
