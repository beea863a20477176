"""Network Slimming's sparsity training (Liu et al., ICCV 2017): an L1 penalty on every BatchNorm scale.

Training with lambda * sum |gamma| (its subgradient lambda * sign(gamma) added to each BatchNorm weight's
gradient, as the paper's code does) drives the scales of unimportant channels towards zero, which makes |gamma|
(`search.criterion: bn_scale`) and one global threshold on it (the global-threshold baseline) meaningful.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

HISTOGRAM_BINS = 20


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that have a learnable scale."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


def add_l1_subgradient(model: nn.Module, strength: float) -> None:
    """Add strength * sign(gamma) to the gradient of every BatchNorm scale (call after backward)."""
    for m in batchnorms(model):
        if m.weight.grad is not None:
            m.weight.grad.add_(strength * torch.sign(m.weight.detach()))


def gamma_histogram(model: nn.Module, top: float | None = None) -> dict:
    """|gamma| of every BatchNorm channel as a histogram over [0, top] (top: the largest |gamma| if None)."""
    values = torch.cat([m.weight.detach().abs().flatten().cpu() for m in batchnorms(model)]).numpy()
    top = float(values.max()) if top is None else top
    counts, edges = np.histogram(np.minimum(values, top), bins=HISTOGRAM_BINS, range=(0.0, max(top, 1e-12)))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "channels": int(len(values)),
            "median": float(np.median(values)), "below_1e-2": int((values < 1e-2).sum())}
