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
import torch.nn as nn

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


# The layer kinds Torch-Pruning's group importances read (its default target_types: convs, linears, batch and
# layer norms): a group unit's importance sums what it scores in each of their dimensions the group prunes.
GROUP_KINDS = ("conv", "dwconv", "grouped_conv", "linear", "batchnorm", "layernorm")
TAYLOR_KINDS = ("conv", "dwconv", "grouped_conv", "linear", "layernorm")  # GroupTaylorImportance reads no BatchNorm
NORM_KINDS = ("batchnorm",)


def group_importance(model: nn.Module, groups: list, kinds: tuple[str, ...] = GROUP_KINDS,
                     gradients: dict[str, torch.Tensor] | None = None) -> list[np.ndarray] | None:
    """Per group (of `PruningSpace.groups`), the importance of each block position: |w| (or |w * dL/dw| given the
    `gradients` of the model's parameters by name) summed over the unit's weights in every dimension of a layer of
    `kinds` the group prunes, averaged over those dimensions and the group's blocks: Torch-Pruning's
    GroupMagnitudeImportance(p=1) (GroupTaylorImportance) with group_reduction "mean", before its normaliser.
    None if a group has no such dimension (methods that prune within a layer; a group without an affine norm)."""
    modules = dict(model.named_modules())
    found = []
    for g in groups:
        importance, read = np.zeros(g.units), 0
        for m in g.members:
            weight = getattr(modules.get(m.module), "weight", None) if m.kind in kinds else None
            if not isinstance(weight, torch.Tensor):
                continue
            axis = 0 if m.role == "out" else 1
            values = weight.detach().double().cpu()
            if gradients is not None:
                values = values * gradients[f"{m.module}.weight"].double().cpu()
            per_index = values.abs().transpose(0, axis).flatten(1).sum(1) if values.dim() > 1 else values.abs()
            # a grouped conv's weight holds in_channels / groups inputs per filter: every block reads the same ones
            np.add.at(importance, m.units, per_index[torch.as_tensor(m.idxs % len(per_index))].numpy())
            read += 1
        if not read:
            return None
        found.append((importance / read).reshape(g.blocks, -1).mean(0))
    return found


def loss_gradients(model: nn.Module, batches, select, loss) -> dict[str, torch.Tensor]:
    """The gradient of the loss summed over `batches` of (x, y) w.r.t. every parameter of `model` by name (zero for
    a frozen one), in eval mode (running statistics untouched), without writing `.grad`: the model is left as it
    was."""
    was_training = model.training
    model.eval()
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    try:
        for x, y in batches:
            y = y.to(device) if isinstance(y, torch.Tensor) else y
            grads = torch.autograd.grad(loss(select(model(x.to(device))), y), list(params.values()),
                                        allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    total[name] += grad
    finally:
        model.train(was_training)
    return total
