"""Fine-tuning a pruned YOLO model in Ultralytics (import this only where ultralytics imports).

`YOLO(path).train(...)` builds a new network from the model's YAML, at the unpruned widths, and copies in only the
weights whose shapes fit: a pruned model would train unpruned. `PrunedDetectionTrainer` trains the loaded network
itself: `YOLO("rank1.ultralytics.pt").train(data="data.yaml", trainer=PrunedDetectionTrainer, ...)`.
"""
from __future__ import annotations

from copy import deepcopy

import torch.nn as nn
from ultralytics.models.yolo.detect import DetectionTrainer


class PrunedDetectionTrainer(DetectionTrainer):
    """Ultralytics' DetectionTrainer that trains the given (pruned) network instead of rebuilding it from its YAML."""

    def get_model(self, cfg=None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """A copy of `weights` (the loaded model); a network built from `cfg` when there is none."""
        if weights is None:
            return super().get_model(cfg, weights, verbose)
        classes = weights.model[-1].nc
        if classes != self.data["nc"]:
            raise ValueError(f"data: the pruned model detects {classes} classes and the data set has "
                             f"{self.data['nc']}; fine-tune it on data of its own classes")
        return deepcopy(weights)
