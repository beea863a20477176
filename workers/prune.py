"""Structural pruning of a trained model by a strategy (one ratio per channel group).

`PrunePlan` is the fast path: the filter ranking of every group is fixed by the base model (Torch-Pruning's
own importance, computed once), so a strategy only decides how many filters each group keeps. Applying it
slices the base weights with index_select and copies the module structure around them: no dependency graph
per candidate. `prune_with_torch_pruning` is the reference (a full Torch-Pruning pass) the tests hold it to.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .groups import trace_groups

CRITERIA = ("l1", "l2", "bn_scale", "random")
SLICEABLE = ("conv", "dwconv", "linear", "bn", "op")


class Importance:
    """Per-filter importance of a Torch-Pruning group for one criterion (higher = keep).

    l1/l2: the L1 (sum |w|) or squared L2 norm of each filter of the group's producer, i.e. its first
    conv/linear layer in model order whose output channels the group prunes (EagleEye's L1); bn_scale: |gamma|
    of the group's first BatchNorm in model order (Network Slimming), L1 for a group without one; random: a
    seeded random ranking (a control). The same object ranks filters for the fast path and for the
    Torch-Pruning reference, so both remove the same filters.
    """

    def __init__(self, criterion: str, seed: int = 0):
        if criterion not in CRITERIA:
            raise ValueError(f"search.criterion: unknown criterion '{criterion}'; allowed: {', '.join(CRITERIA)}")
        self.criterion, self.seed = criterion, seed
        self._positions: dict[int, dict] = {}

    def _ordered_items(self, group) -> list:
        dg = group._DG
        if id(dg) not in self._positions:
            self._positions[id(dg)] = {m: i for i, m in enumerate(dg.model.modules())}
        position = self._positions[id(dg)]
        items = [item for item in group if item.dep.target.module in position]
        return sorted(items, key=lambda item: position[item.dep.target.module])

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        import torch_pruning as tp

        n = len(group[0].idxs)
        if self.criterion == "random":
            root = group._DG._module2name[group[0].dep.target.module]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(root.encode()))
            return torch.rand(n, generator=g)
        items = self._ordered_items(group)
        values = None
        if self.criterion == "bn_scale":
            bns = [it for it in items if isinstance(it.dep.target.module, nn.modules.batchnorm._BatchNorm)
                   and it.dep.target.module.affine]
            if bns:
                item = bns[0]
                values = item.dep.target.module.weight.detach()[item.idxs].abs().float()
        if values is None:
            producers = [it for it in items if it.dep.handler in (tp.prune_conv_out_channels,
                                                                   tp.prune_linear_out_channels)]
            item = producers[0]
            p = 2 if self.criterion == "l2" else 1
            values = item.dep.target.module.weight.detach()[item.idxs].flatten(1).abs().pow(p).sum(1).float()
        imp = torch.zeros(n)
        imp[torch.as_tensor(item.root_idxs)] = values.cpu()
        return imp


@dataclass
class _Dim:
    """One sliced dimension of one layer, with the groups that govern parts of it."""

    module: str
    kind: str
    role: str
    parts: list[tuple[int, np.ndarray, np.ndarray]]  # (group index, member idxs, root idxs)


class PrunePlan:
    """Everything about pruning `model` that does not depend on the strategy, built once per worker."""

    def __init__(self, model: nn.Module, space, criterion: str = "l1", seed: int = 0):
        self.model, self.space, self.criterion = model, space, criterion
        self.order = self._rankings(model, space, criterion, seed)
        dims: dict[tuple[str, str], _Dim] = {}
        for gi, g in enumerate(space.groups):
            for mem in g.members:
                d = dims.setdefault((mem.module, mem.role), _Dim(mem.module, mem.kind, mem.role, []))
                d.parts.append((gi, mem.idxs, mem.root_idxs))
        self.dims = {key: d for key, d in dims.items() if d.kind != "op"}
        self.fast = all(d.kind in SLICEABLE for d in self.dims.values())
        self.modules = dict(model.named_modules())
        self.sizes = {key: _dim_size(self.modules[key[0]], key[1]) for key in self.dims} if self.fast else {}

    @staticmethod
    def _rankings(model: nn.Module, space, criterion: str, seed: int) -> list[np.ndarray]:
        """Root channels of each group, least important first (Torch-Pruning's importance on the base model)."""
        importance = Importance(criterion, seed)
        reference = copy.deepcopy(model).cpu().eval()  # tracing puts hooks on and must not touch the caller's model
        _, tp_groups, _, _ = trace_groups(reference, space.example_input(), space.ignored_layers)
        names = {m: n for n, m in reference.named_modules()}
        groups = {names[root]: g for root, g in tp_groups}
        return [np.argsort(importance(groups[g.root]).numpy(), kind="stable") for g in space.groups]

    def keep_indices(self, ratios) -> dict[tuple[str, str], np.ndarray]:
        """Indices each sliced (layer, out|in) dimension keeps under the strategy, in ascending order."""
        kept = self.space.kept_channels(ratios)
        pruned_root = []
        for g, k, order in zip(self.space.groups, kept, self.order):
            mask = np.zeros(g.channels, dtype=bool)
            mask[order[: g.channels - k]] = True
            pruned_root.append(mask)
        keep = {}
        for key, d in self.dims.items():
            mask = np.ones(self.sizes[key], dtype=bool)
            for gi, idxs, roots in d.parts:
                mask[idxs[pruned_root[gi][roots]]] = False
            keep[key] = np.flatnonzero(mask)
        return keep

    def apply(self, ratios) -> nn.Module:
        """A new, smaller dense copy of the base model pruned by `ratios`."""
        if not self.fast:
            return prune_with_torch_pruning(self.model, self.space, ratios, self.criterion)
        keep = self.keep_indices(ratios)
        modules = self.modules
        device = next(self.model.parameters()).device
        new_tensors: dict[tuple[str, str], torch.Tensor] = {}
        for (name, role), idx in keep.items():
            module = modules[name]
            index = torch.from_numpy(idx).to(device)
            for attr, dim in _slices(module, self.dims[(name, role)].kind, role):
                source = new_tensors.get((name, attr), getattr(module, attr))
                new_tensors[(name, attr)] = source.index_select(dim, index)
        memo = {}
        for (name, attr), t in new_tensors.items():
            old = getattr(modules[name], attr)
            memo[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        pruned = _clone_module(self.model, memo)
        new_modules = dict(pruned.named_modules())
        for (name, role), idx in keep.items():
            _set_sizes(new_modules[name], role, len(idx))
        return pruned


def _clone_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """A copy of the module tree, like copy.deepcopy(module, memo) but much cheaper for a large tree.

    Parameters and buffers not in `memo` are cloned; a module or tensor used twice is copied once (as deepcopy
    does). Other module attributes are copied one level deep: dicts, lists and sets (hooks, for one) get new
    containers; numbers, strings, functions and other objects are shared with the original.
    """
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = {k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
    for key in ("_parameters", "_buffers"):
        for name, old in state[key].items():
            if old is not None and id(old) not in memo:
                t = old.detach().clone()
                memo[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
            state[key][name] = None if old is None else memo[id(old)]
    state["_modules"] = {k: None if m is None else _clone_module(m, memo) for k, m in module._modules.items()}
    new.__dict__ = state
    return new


def _dim_size(module: nn.Module, role: str) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    return module.num_features


def _slices(module: nn.Module, kind: str, role: str) -> list[tuple[str, int]]:
    """(tensor attribute, dimension) pairs to slice for one layer dimension."""
    if kind == "bn":
        names = ["weight", "bias"] if module.affine else []
        if module.track_running_stats:
            names += ["running_mean", "running_var"]
        return [(n, 0) for n in names]
    if role == "in":
        return [("weight", 1)]
    return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])


def _set_sizes(module: nn.Module, role: str, n: int) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:  # depthwise: channels and groups move together
            module.in_channels = module.out_channels = module.groups = n
        elif role == "out":
            module.out_channels = n
        else:
            module.in_channels = n
    elif isinstance(module, nn.Linear):
        if role == "out":
            module.out_features = n
        else:
            module.in_features = n
    else:
        module.num_features = n


def prune_with_torch_pruning(model: nn.Module, space, ratios, criterion: str = "l1", seed: int = 0) -> nn.Module:
    """Reference path: a full Torch-Pruning MetaPruner pass on a deep copy (slow; the fast path must match it)."""
    import torch_pruning as tp

    ratios = space.check(ratios)
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    device = next(pruned.parameters()).device
    pruner = tp.pruner.MetaPruner(
        pruned, space.example_input().to(device), importance=Importance(criterion, seed),
        pruning_ratio=0.0, pruning_ratio_dict={modules[g.root]: float(r) for g, r in zip(space.groups, ratios)},
        ignored_layers=[modules[n] for n in space.ignored_layers], round_to=space.round_to if space.round_to > 1 else None)
    pruner.step()
    return pruned


def prune(model: nn.Module, space, ratios, criterion: str = "l1") -> nn.Module:
    """Prune a copy of `model` by `ratios` (one per group of `space`); the result is a smaller dense network."""
    return PrunePlan(model, space, criterion).apply(ratios)
