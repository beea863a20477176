"""Sparsity training: an L1 penalty that drives the scales of unimportant units towards zero.

Network Slimming (Liu et al., ICCV 2017) penalises every BatchNorm scale: lambda * sum |gamma|, its subgradient
lambda * sign(gamma) added to each scale's gradient as the paper's code does, which makes |gamma|
(`search.criterion: bn_scale`) and one global threshold on it (the global-threshold baseline) meaningful.
Stripe-wise pruning's Filter Skeleton (`stripes.skeleton_train`) penalises one scale per stripe the same way.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import DataBundle
from .finetune import FinetuneOptions, finetune
from .settings import FinetuneSettings

HISTOGRAM_BINS = 20


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model` that have a learnable scale."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


def add_l1_subgradient(params: Sequence[torch.Tensor], strength: float) -> None:
    """Add strength * sign(p) to the gradient of each parameter (an L1 penalty; call after backward)."""
    for p in params:
        if p.grad is not None:
            p.grad.add_(strength * torch.sign(p.detach()))


def slimming_train(model: nn.Module, data: DataBundle, settings: FinetuneSettings, strength: float,
                   options: FinetuneOptions | None = None) -> None:
    """Network Slimming's sparsity training: fine-tune with `strength` * sum |gamma| over every BatchNorm scale
    (in place; resumable from options.checkpoint_path, on options.train_indices of the training split if given)."""
    scales = [m.weight for m in batchnorms(model)]
    finetune(model, data, settings, sparsity_options(options or FinetuneOptions(), scales, strength))


def sparsity_options(options: FinetuneOptions, scales: Sequence[torch.Tensor], strength: float) -> FinetuneOptions:
    """`options` for a sparsity training: its stage name, and `strength` * sign(scale) added after each backward."""
    return replace(options, stage="sparsity training", after_backward=lambda: add_l1_subgradient(scales, strength))


def bn_scales(model: nn.Module) -> np.ndarray:
    """|gamma| of every BatchNorm channel (what Network Slimming makes sparse)."""
    return torch.cat([m.weight.detach().abs().flatten().cpu() for m in batchnorms(model)]).numpy()


def histogram(values: np.ndarray, top: float | None = None) -> dict:
    """A histogram of non-negative values over [0, top] (top: the largest value if None), with a summary."""
    top = float(values.max()) if top is None else top
    counts, edges = np.histogram(np.minimum(values, top), bins=HISTOGRAM_BINS, range=(0.0, max(top, 1e-12)))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "channels": int(len(values)),
            "median": float(np.median(values)), "below_1e-2": int((values < 1e-2).sum())}
