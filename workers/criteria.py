"""Pruning criteria as importance objects (Torch-Pruning's `Importance` is the model): how much each unit of a
layer is worth keeping, higher = keep.

A criterion scores the rows of a tensor, one row per unit (a filter, a single weight, a stripe): `l1` sums |w|
(EagleEye's L1), `l2` sums w^2, `bn_scale` is |gamma| of a BatchNorm (Network Slimming; the method hands it the
BatchNorm's scales instead of the weights: `source`), `random` is a seeded random draw (a control).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .seeds import generator

WEIGHT, BATCHNORM = "weight", "batchnorm"  # what a criterion reads: the unit's weights, or its BatchNorm scale


@dataclass(frozen=True)
class Criterion:
    """Scores the units of one tensor: rows [units, ...] in, one importance per unit out."""

    name: str
    power: int | None  # |w|^power summed over a row; None: a seeded random draw
    source: str = WEIGHT

    def __call__(self, rows: torch.Tensor, seed: int = 0, salt: int | str = 0) -> np.ndarray:
        """Importance of each row (unit) of `rows`; `seed` and `salt` (the layer) fix a random draw."""
        if self.power is None:
            return torch.rand(len(rows), generator=generator(seed, salt)).double().numpy()
        values = rows.detach().float().cpu().abs().pow(self.power)
        return (values.flatten(1).sum(1) if values.dim() > 1 else values).double().numpy()


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("l1", 1), Criterion("l2", 2), Criterion("bn_scale", 1, BATCHNORM), Criterion("random", None))}
