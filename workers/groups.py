"""Channel groups of a model, found with Torch-Pruning's DependencyGraph, as plain picklable data."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn


@dataclass(frozen=True)
class Member:
    """One layer dimension a group prunes: module name, kind, `out` or `in`, and its index map to the root.

    kind is `conv`, `dwconv` (depthwise), `linear`, `bn`, `op` (a parameter-free leaf such as pooling) or
    `unsupported:<type>` (the fast slicer then defers to Torch-Pruning).
    """

    module: str
    kind: str
    role: str
    idxs: np.ndarray  # indices of the module's dimension governed by this group
    root_idxs: np.ndarray  # the root channel each of those indices follows


@dataclass
class ChannelGroup:
    """A set of coupled channels pruned together with one ratio.

    Named after its producer (the first conv/linear, in model order, whose filters it prunes); `root` is the
    layer Torch-Pruning enumerates it by (for MobileNet that is a depthwise conv following the producer).
    """

    name: str
    channels: int
    members: list[Member] = field(repr=False)
    root: str = ""
    flops_share: float = 0.0


class SpaceError(ValueError):
    """A model or strategy that does not fit the pruning space."""


def layer_kind(module: nn.Module) -> str:
    """The kind of a layer as the pruning code sees it (see Member)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "unsupported:ConvTranspose"
        if module.groups == module.out_channels and module.out_channels > 1:
            return "dwconv"
        return "conv" if module.groups == 1 else "unsupported:grouped-conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if not list(module.parameters(recurse=False)):
        return "op"
    return f"unsupported:{type(module).__name__}"


def find_classifier(model: nn.Module, example_inputs: torch.Tensor) -> str:
    """Name of the last Conv/Linear layer run in the forward pass (the classifier, never pruned)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise SpaceError("model: no Conv or Linear layer found to prune")
    return order[-1]


def trace_groups(model: nn.Module, example_inputs: torch.Tensor, ignored: list[str]):
    """Build Torch-Pruning's graph; return (DG, [(root, TP group)], {grad_fn: leaf name}, {leaf name: channels})."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    grad_fn_owner: dict = {}
    channels: dict[str, int] = {}

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            grad_fn_owner[output.grad_fn] = names[module]
            channels[names[module]] = output.shape[1] if output.dim() > 1 else output.shape[0]

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        for h in hooks:
            h.remove()
    groups = [(g[0].dep.target.module, g) for g in dg.get_all_groups(ignored_layers=ignored_modules)]
    groups = [(root, g) for root, g in groups if len(g[0].idxs) > 1]  # Torch-Pruning skips 1-channel groups
    return dg, groups, grad_fn_owner, channels


def _members(dg, group, names: dict, grad_fn_owner: dict) -> list[Member]:
    """The group's layer dimensions, in Torch-Pruning's item order, merged per (module, role)."""
    members: dict[tuple[str, str], Member] = {}
    for item in group:
        node = item.dep.target
        module = node.module
        if isinstance(module, nn.Parameter):
            raise SpaceError("model: a bare nn.Parameter is coupled to a prunable group; not supported")
        if module in names:
            name, kind = names[module], layer_kind(module)
        elif node.grad_fn in grad_fn_owner:  # output of a parameter-free leaf module (pooling, activation)
            name, kind = grad_fn_owner[node.grad_fn], "op"
        else:
            continue  # functional op (add, cat, view...): nothing to slice; its FLOPs count as fixed
        role = "out" if kind in ("bn", "dwconv", "op") or dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        idxs = np.asarray(item.idxs, dtype=np.int64)
        roots = np.asarray(item.root_idxs, dtype=np.int64)
        old = members.get((name, role))
        if old is not None:  # the same dimension reached twice: merge
            idxs, where = np.unique(np.concatenate([old.idxs, idxs]), return_index=True)
            roots = np.concatenate([old.root_idxs, roots])[where]
        members[(name, role)] = Member(name, kind, role, idxs, roots)
    return list(members.values())


def discover_groups(model: nn.Module, example_inputs: torch.Tensor, ignored: list[str]
                    ) -> tuple[list[ChannelGroup], dict[str, int]]:
    """The prunable channel groups of `model` (classifier and `ignored` excluded) and op channel counts."""
    names = {m: n for n, m in model.named_modules()}
    dg, tp_groups, grad_fn_owner, op_channels = trace_groups(model, example_inputs, ignored)
    position = {name: i for i, name in enumerate(names.values())}
    groups = []
    for root, g in tp_groups:
        members = _members(dg, g, names, grad_fn_owner)
        producers = [m.module for m in members if m.role == "out" and m.kind in ("conv", "linear")]
        name = min(producers, key=position.__getitem__) if producers else names[root]
        groups.append(ChannelGroup(name, len(g[0].idxs), members, root=names[root]))
    groups.sort(key=lambda g: position[g.name])  # model order, input to output
    return groups, op_channels
