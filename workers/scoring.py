"""Score a network on the held-out split with its task's metric (top-1 accuracy by default), deterministically."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .settings import EvaluationSettings, FinetuneSettings
from .tasks import CLASSIFICATION, Task, as_float


def precision(settings: EvaluationSettings | FinetuneSettings, device: torch.device
              ) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype and channels_last choice of the settings' `amp` and `channels_last` (auto: bf16 and
    channels_last on CUDA)."""
    cuda = device.type == "cuda"
    amp, layout = settings.amp, settings.channels_last
    return (torch.bfloat16 if amp == "bf16" or (amp == "auto" and cuda) else None,
            layout == "on" or (layout == "auto" and cuda))


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[tuple[torch.Tensor, object]],
          autocast_dtype: torch.dtype | None = None, task: Task = CLASSIFICATION) -> dict:
    """The task's figures (classification: accuracy and mean loss) and the sample count of `model` (in eval mode)
    over (x, target) batches: the task's statistics summed over the batches, then scored."""
    model.eval()
    total, n = None, 0
    device_type = next(model.parameters()).device.type
    for x, y in batches:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            prediction = task.select(model(x))
        statistics = task.statistics(as_float(prediction), y).double().cpu()
        total = statistics if total is None else total + statistics
        n += len(x)
    if total is None:
        raise ValueError("score: no held-out samples")
    return {**task.score(total), "samples": n}
