"""Score a network on the held-out split: top-1 accuracy and mean cross-entropy, deterministically."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


def precision(cfg, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype and channels_last choice of a config's `amp` and `channels_last` keys (auto: bf16 and
    channels_last on CUDA; a config without them: neither)."""
    cuda = device.type == "cuda"
    amp, layout = getattr(cfg, "amp", "off"), getattr(cfg, "channels_last", "off")
    return (torch.bfloat16 if amp == "bf16" or (amp == "auto" and cuda) else None,
            layout == "on" or (layout == "auto" and cuda))


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
          autocast_dtype: torch.dtype | None = None) -> dict:
    """Accuracy, mean loss and sample count of `model` (in eval mode) over (x, y) batches."""
    model.eval()
    correct = 0
    loss_sum = torch.zeros((), dtype=torch.float64)
    n = 0
    device_type = next(model.parameters()).device.type
    for x, y in batches:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("score: no held-out samples")
    return {"accuracy": correct / n, "loss": float(loss_sum) / n, "samples": n}
