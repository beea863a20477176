"""Adaptive BatchNorm: recalibrate running statistics of a pruned network with a few training batches."""
from __future__ import annotations

import warnings
from typing import Iterable, cast

import torch
import torch.nn as nn

BN_MODES = ("cumulative", "ema", "none")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], mode: str = "cumulative",
                   autocast_dtype: torch.dtype | None = None, tolerance: float | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from `batches`; the number of batches used (0, with a
    warning, if the model has no BatchNorm).

    cumulative: reset the statistics and use momentum=None, i.e. the equal-weight average of the per-batch
    mean and (unbiased) variance over all batches. ema: EagleEye's way, keep each layer's momentum (0.1) and
    let the running averages move towards the new batches. tolerance: stop early, once a batch moves no layer's
    running mean or variance by more than this fraction (relative L2 change; from the third batch on). Only
    BatchNorm layers run in training mode (so dropout stays off); the model is left in eval mode.
    """
    if mode not in BN_MODES:
        raise ValueError(f"evaluation.bn_mode: unknown mode '{mode}'; allowed: {', '.join(BN_MODES)}")
    layers = batchnorm_layers(model)
    if mode == "none":
        return 0
    if not layers:
        warnings.warn("model has no BatchNorm layer: scored without recalibration", stacklevel=2)
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.train()
        if mode == "cumulative":
            m.reset_running_stats()
            m.momentum = None
    device_type = next(model.parameters()).device.type
    used, previous = 0, None
    try:
        for x in batches:
            with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                model(x)
            used += 1
            if tolerance is not None:
                current = [torch.cat([cast(torch.Tensor, m.running_mean), cast(torch.Tensor, m.running_var)]).float()
                           for m in layers]  # reset above: a recalibrated layer tracks its statistics
                if previous is not None and used > 2 and max(float((c - p).norm() / (p.norm() + 1e-12))
                                                             for c, p in zip(current, previous)) < tolerance:
                    break
                previous = [c.clone() for c in current]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return used
