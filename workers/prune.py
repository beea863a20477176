"""Structural pruning of a trained model by a strategy (one ratio per channel group).

The filter ranking of every group is fixed by the base model (`rank_units`, computed once), so a strategy only
decides how many channels each group keeps. `PrunePlan.apply` slices the base weights with index_select, as
the layer kinds in `layers.py` say, and copies the module structure around them: no dependency graph per
candidate. The tests hold it to Torch-Pruning's own surgery on the same channels, tensor for tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from .criteria import BATCHNORM, CRITERIA, Criterion
from .groups import OP, PARAMETER, Group, dim_size
from .layers import OUT, PRODUCERS, LayerKind, kind_of, layer_kind, weight_of

if TYPE_CHECKING:  # space.py builds on this module (its functional fit prunes); only the annotations point back
    from .space import PruningSpace

def _unit_importance(model: nn.Module, group: Group, criterion: Criterion, seed: int,
                     position: dict[str, int]) -> np.ndarray:
    """Importance of each unit of a group (higher = keep): the criterion on the filters of the group's producer,
    its first conv/linear layer in model order whose output channels the group prunes (EagleEye's L1); a
    BatchNorm criterion (bn_scale) reads the group's first affine BatchNorm in model order instead, the producer
    for a group without one."""
    ordered = sorted(group.members, key=lambda m: position.get(m.module.rsplit(".", 1)[0] if m.kind == PARAMETER
                                                                 else m.module, 0))
    member = None
    if criterion.source == BATCHNORM:
        bns = [m for m in ordered if m.kind == "batchnorm" and getattr(model.get_submodule(m.module), "affine", False)]
        member = bns[0] if bns else None
    if member is None:  # the first producer; a group of depthwise convs only ranks by its first one
        producers = [m for m in ordered if m.role == "out" and m.kind in PRODUCERS]
        member = (producers or [m for m in ordered if m.kind == "dwconv"])[0]
    module = model.get_submodule(member.module)
    axis = dict(layer_kind(module).tensors(module, OUT))["weight"]  # the filters' axis (1 in a transposed conv)
    rows = weight_of(model, member.module).detach().movedim(axis, 0)[member.idxs]
    importance = np.zeros(group.units)
    np.add.at(importance, member.units, criterion(rows, seed, group.root))
    return importance


def position_importance(model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0
                        ) -> list[np.ndarray]:
    """Per group, the importance of each block position (a unit's importance averaged over the group's blocks)."""
    if criterion not in CRITERIA:
        raise ValueError(f"search.criterion: unknown criterion '{criterion}'; allowed: {', '.join(CRITERIA)}")
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return [_unit_importance(model, g, CRITERIA[criterion], seed, position).reshape(g.blocks, -1).mean(0)
            for g in space.groups]


def rank_units(model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0) -> list[np.ndarray]:
    """Per group, its block positions least important first."""
    return [np.argsort(imp, kind="stable") for imp in position_importance(model, space, criterion, seed)]


@dataclass
class _Dim:
    """One sliced dimension of one layer (or bare parameter), with the groups that govern parts of it."""

    target: str
    layer: LayerKind | None  # None for a bare parameter
    role: str
    axis: int
    size: int
    parts: list[tuple[int, np.ndarray, np.ndarray]]  # (group index, member idxs, member units)


class PrunePlan:
    """Everything about pruning `model` that does not depend on the strategy, built once per worker."""

    def __init__(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0,
                 order: list[np.ndarray] | None = None):
        self.model, self.space, self.criterion = model, space, criterion
        self.order = order if order is not None else rank_units(model, space, criterion, seed)
        self.modules = dict(model.named_modules())
        self.dims: dict[tuple[str, str], _Dim] = {}
        for gi, g in enumerate(space.groups):
            for mem in g.members:
                if mem.kind == OP:
                    continue
                key = (mem.module, mem.role)
                if key not in self.dims:
                    layer = None if mem.kind == PARAMETER else kind_of(self.modules[mem.module])
                    self.dims[key] = _Dim(mem.module, layer, mem.role, mem.axis, dim_size(model, mem), [])
                self.dims[key].parts.append((gi, mem.idxs, mem.units))

    def pruned_units(self, ratios) -> list[np.ndarray]:
        """Per group, a boolean mask of the units the strategy removes (the same positions in every block)."""
        masks = []
        for g, kept, order in zip(self.space.groups, self.space.kept_units(ratios), self.order):
            width = g.units // g.blocks
            local = np.zeros(width, dtype=bool)
            local[order[: (g.units - kept) // g.blocks]] = True
            masks.append(np.tile(local, g.blocks))
        return masks

    def keep_indices(self, ratios) -> dict[tuple[str, str], np.ndarray]:
        """Indices each sliced (layer, out|in) dimension keeps under the strategy, in ascending order."""
        pruned = self.pruned_units(ratios)
        keep = {}
        for key, d in self.dims.items():
            mask = np.ones(d.size, dtype=bool)
            for gi, idxs, units in d.parts:
                mask[idxs[pruned[gi][units]]] = False
            keep[key] = np.flatnonzero(mask)
        return keep

    def _slices(self, d: _Dim, keep: np.ndarray) -> list[tuple[str, str, int, np.ndarray]]:
        """(owner module, tensor attribute, axis, indices) to index_select for one pruned dimension."""
        if d.layer is None:
            owner, _, attr = d.target.rpartition(".")
            return [(owner, attr, d.axis, keep)]
        module = self.modules[d.target]
        local = d.layer.local_index(module, d.role, keep)
        return [(d.target, attr, axis, local) for attr, axis in d.layer.tensors(module, d.role)]

    def apply(self, ratios) -> nn.Module:
        """A new, smaller dense copy of the base model pruned by `ratios`."""
        keep = self.keep_indices(ratios)
        device = next(self.model.parameters()).device
        new_tensors: dict[tuple[str, str], torch.Tensor] = {}
        for key, idx in keep.items():
            for owner, attr, axis, local in self._slices(self.dims[key], idx):
                source = new_tensors.get((owner, attr), getattr(self.modules[owner], attr))
                new_tensors[(owner, attr)] = source.index_select(axis, torch.from_numpy(local).to(device))
        memo = {}
        for (owner, attr), t in new_tensors.items():
            old = getattr(self.modules[owner], attr)
            memo[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        pruned = clone_module(self.model, memo)
        new_modules = dict(pruned.named_modules())
        for (target, role), idx in keep.items():
            layer = self.dims[(target, role)].layer
            if layer is not None:
                layer.resize(new_modules[target], role, len(idx))
        kept = self.space.kept_units(ratios)
        for g, k in zip(self.space.groups, kept):  # the part size of an equal split by sizes, where a module holds it
            for module, attribute in g.part_sizes:
                setattr(new_modules[module], attribute, getattr(self.modules[module], attribute) * int(k) // g.units)
        return pruned


def clone_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of the module tree, like copy.deepcopy(module, memo) but much cheaper for a large tree.

    Parameters and buffers not in `memo` are cloned; a module or tensor used twice is copied once (as deepcopy
    does). Other module attributes are copied one level deep: dicts, lists and sets (hooks, for one) get new
    containers; numbers, strings, functions and other objects are shared with the original.
    """
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state: dict[str, Any] = {k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
    for key in ("_parameters", "_buffers"):
        for name, old in state[key].items():
            if old is not None and id(old) not in memo:
                t = old.detach().clone()
                memo[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
            state[key][name] = None if old is None else memo[id(old)]
    state["_modules"] = {k: None if m is None else clone_module(m, memo) for k, m in module._modules.items()}
    new.__dict__ = state
    return new


def prune(model: nn.Module, space: PruningSpace, ratios, criterion: str = "l1") -> nn.Module:
    """Prune a copy of `model` by `ratios` (one per group of `space`); the result is a smaller dense network."""
    return PrunePlan(model, space, criterion).apply(ratios)
