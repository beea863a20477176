"""Unstructured pruning with `torch.nn.utils.prune`: one sparsity per prunable weight tensor.

The space has one "group" per conv/linear weight (the classifier and `model.ignored_layers` stay dense) whose
units are single weights. A strategy keeps floor(n * (1 - r)) weights of each tensor, the largest by magnitude
(`l1`, `l2`) or a seeded random set (`random`), as `torch.nn.utils.prune` masks; the network keeps its dense
shapes. Params count the non-zero weights (plus every parameter that is not pruned); FLOPs count the
multiply-adds of non-zero weights: a layer's fvcore FLOPs scale with its density. Both are linear in the kept
counts, so the sampler, every algorithm and the baselines work unchanged; the preflight checks both against a
direct count on masked networks. Dense kernels do not run zeros faster: the gain is size (see `sparse_state`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from .groups import ChannelGroup, SpaceError, find_classifier
from .layers import kind_of
from .preflight import Verdict, check_width, prove
from .prune import clone_module
from .space import PruningSpace, count_flops, own_flops

_PRUNABLE = ("conv", "dwconv", "grouped_conv", "linear")


def prunable_weights(model: nn.Module, ignored: list[str]) -> list[str]:
    """Names of the conv/linear layers whose weights an unstructured strategy prunes, in model order."""
    return [name for name, m in model.named_modules()
            if kind_of(m) is not None and kind_of(m).name in _PRUNABLE and name not in ignored]


def linear_space(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: list[str] | None,
                 select: Callable[[nn.Module, list[str]], list[str]], units_of: Callable[[nn.Module], int],
                 nothing: str) -> PruningSpace:
    """A space with one group per selected layer whose units (`units_of`) each carry an equal share of the
    layer's fvcore FLOPs and weight: FLOPs and params are linear in the kept units (unstructured, stripes)."""
    model.eval()
    classifier = find_classifier(model, example_inputs)
    ignored = [classifier] + [n for n in ignored_layers or [] if n != classifier]
    modules = dict(model.named_modules())
    unknown = [n for n in ignored if n not in modules]
    if unknown:
        raise SpaceError(f"model.ignored_layers: the model has no layer named '{unknown[0]}'")
    names = select(model, ignored)
    if not names:
        raise SpaceError(f"model: {nothing}")
    fca = count_flops(model, example_inputs)
    by_module, total = fca.by_module(), int(fca.total())
    base_params = sum(p.numel() for p in model.parameters())
    units = np.array([units_of(modules[n]) for n in names], dtype=np.float64)
    weights = np.array([modules[n].weight.numel() for n in names], dtype=np.float64)
    flops = np.array([own_flops(by_module, model, n) for n in names], dtype=np.float64)
    groups = [ChannelGroup(n, int(u), [], root=n) for n, u in zip(names, units)]
    g = len(groups)
    dim_const = np.zeros(g + 1)
    dim_const[0] = 1.0  # row 0 is the constant 1; row i + 1 is group i's kept units
    dim_matrix = np.vstack([np.zeros(g), np.eye(g)])
    rows, zeros = np.arange(1, g + 1, dtype=np.int64), np.zeros(g, dtype=np.int64)
    flops_terms = (float(total - flops.sum()), flops / units, rows, zeros)
    params_terms = (float(base_params - weights.sum()), weights / units, rows, zeros)
    return PruningSpace(groups, total, base_params, dim_const, dim_matrix, flops_terms, params_terms, 1, ignored,
                        tuple(example_inputs.shape[1:]))


def unstructured_space(model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
                       ignored_layers: list[str] | None = None) -> PruningSpace:
    """The space of per-tensor sparsities: one group per prunable weight, FLOPs and params on non-zero weights."""
    space = linear_space(model, example_inputs, ignored_layers, prunable_weights, lambda m: m.weight.numel(),
                         "no prunable weight (every conv/linear layer is the classifier or ignored)")
    space.unit = "weights"
    return space


def weight_importance(model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0
                      ) -> list[np.ndarray]:
    """Per prunable weight tensor, the importance of each weight (|w|, w^2, or seeded random), flattened."""
    if criterion == "bn_scale":
        raise SpaceError("search.criterion: bn_scale ranks channels by BatchNorm scales; unstructured pruning "
                         "ranks single weights: use l1 (magnitude), l2 or random")
    found = []
    for i, g in enumerate(space.groups):
        w = model.get_submodule(g.name).weight.detach().flatten().float().cpu()
        if criterion == "random":
            found.append(torch.rand(len(w), generator=torch.Generator().manual_seed(seed * 1_000_003 + i)).numpy())
        else:
            found.append((w.abs() if criterion == "l1" else w.pow(2)).double().numpy())
    return found


def ascending(importance: list[np.ndarray]) -> list[torch.Tensor]:
    """Per group, its units least important first (the order a pruner removes them in)."""
    return [torch.from_numpy(np.argsort(imp, kind="stable")) for imp in importance]


class MaskPlan:
    """Turns a strategy into a masked copy of the base model (torch.nn.utils.prune masks, dense shapes)."""

    def __init__(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0):
        self.model, self.space = model, space
        self.order = ascending(weight_importance(model, space, criterion, seed))

    def masks(self, ratios) -> list[torch.Tensor]:
        """Per prunable tensor, the mask that keeps the strategy's most important weights."""
        found = []
        for g, kept, order in zip(self.space.groups, self.space.kept_channels(ratios), self.order):
            weight = self.model.get_submodule(g.name).weight
            mask = torch.ones(weight.numel(), device=weight.device)
            mask[order[: g.channels - kept].to(weight.device)] = 0
            found.append(mask.view_as(weight))
        return found

    def apply(self, ratios) -> nn.Module:
        """A copy of the base model with the strategy's masks (`weight_orig` * `weight_mask`; fine-tuning keeps them)."""
        pruned = clone_module(self.model, {})
        for g, mask in zip(self.space.groups, self.masks(ratios)):
            torch_prune.custom_from_mask(pruned.get_submodule(g.name), "weight", mask)
        return pruned


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the masks permanent (`torch.nn.utils.prune.remove`): plain weights with zeros, in place."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model


def direct_counts(model: nn.Module, pruned: nn.Module, example_inputs: torch.Tensor) -> tuple[float, int]:
    """FLOPs on non-zero weights and non-zero params of a masked network, counted on it (not on the space)."""
    fca = count_flops(pruned, example_inputs)
    by_module, flops = fca.by_module(), float(fca.total())
    params = 0
    for name, m in pruned.named_modules():
        if hasattr(m, "weight_mask"):
            density = float(m.weight_mask.sum()) / m.weight_mask.numel()
            flops -= own_flops(by_module, pruned, name) * (1 - density)
    for name, p in pruned.named_parameters():
        owner = pruned.get_submodule(name.rsplit(".", 1)[0]) if "." in name else pruned
        params += int(owner.weight_mask.sum()) if name.endswith("weight_orig") else p.numel()
    return flops, params


def preflight(model: nn.Module, example_inputs: torch.Tensor, num_classes: int, max_ratio: float,
              first: Callable[[PruningSpace], list[float]], round_to: int = 1,
              ignored_layers: list[str] | None = None) -> Verdict:
    """Build the space and prove it on the most pruned and the first strategy: the masked networks run, have
    the right output width, and their directly counted FLOPs and params equal the space's."""
    check_width(model, example_inputs, num_classes)
    space = unstructured_space(model, example_inputs, round_to, ignored_layers)
    strategies = {"most pruned": np.full(len(space.groups), max_ratio), "first sampled": np.array(first(space))}
    return prove(model, example_inputs, num_classes, space, MaskPlan(model, space), strategies,
                 lambda pruned: direct_counts(model, pruned, example_inputs), "a direct count of its non-zero weights")


def sparse_state(model: nn.Module) -> dict:
    """A state dict that stores each masked weight as a packed bit mask plus its non-zero values (uint8 + float)."""
    full, state = model.state_dict(), {}
    for key, value in full.items():
        if key.endswith("weight_mask"):
            continue
        if key.endswith("weight_orig"):
            prefix = key[: -len("weight_orig")]
            mask = full[prefix + "weight_mask"].bool()
            state[prefix + "weight.bits"] = torch.from_numpy(np.packbits(mask.flatten().cpu().numpy()))
            state[prefix + "weight.values"] = value[mask].cpu()
            state[prefix + "weight.shape"] = torch.tensor(list(value.shape))
        else:
            state[key] = value.cpu()
    return state


def dense_state(state: dict) -> dict:
    """The masked state dict (`weight_orig`, `weight_mask`) of a `sparse_state`."""
    dense = {}
    for key, value in state.items():
        if key.endswith("weight.bits"):
            prefix = key[: -len("weight.bits")]
            shape = tuple(int(s) for s in state[prefix + "weight.shape"])
            n = math.prod(shape)
            mask = torch.from_numpy(np.unpackbits(value.numpy())[:n].astype(bool))
            weight = torch.zeros(n, dtype=state[prefix + "weight.values"].dtype)
            weight[mask] = state[prefix + "weight.values"]
            dense[prefix + "weight_orig"] = weight.view(shape)
            dense[prefix + "weight_mask"] = mask.view(shape).float()
        elif not key.endswith(("weight.values", "weight.shape")):
            dense[key] = value
    return dense
