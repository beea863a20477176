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

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from ..layers import kind_of, weight_of
from ..preflight import PreflightOptions, Verdict
from ..space import PruningSpace, count_flops, own_flops
from .protocol import SparsityTraining
from .units import UnitPlan, layer_importance, linear_space, prove

_PRUNABLE = ("conv", "dwconv", "grouped_conv", "linear")


def prunable_weights(model: nn.Module, ignored: list[str]) -> list[str]:
    """Names of the conv/linear layers whose weights an unstructured strategy prunes, in model order."""
    return [name for name, m in model.named_modules()
            if (kind := kind_of(m)) is not None and kind.name in _PRUNABLE and name not in ignored]


def unstructured_space(model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
                       ignored_layers: list[str] | None = None) -> PruningSpace:
    """The space of per-tensor sparsities: one group per prunable weight, FLOPs and params on non-zero weights."""
    return linear_space(model, example_inputs, ignored_layers, prunable_weights, lambda m: weight_of(m).numel(),
                        "no prunable weight (every conv/linear layer is the classifier or ignored)", "weights")


def weight_importance(model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0
                      ) -> list[np.ndarray]:
    """Per prunable weight tensor, the importance of each weight (|w|, w^2, or seeded random), flattened."""
    return layer_importance(model, space, criterion, seed, METHOD, lambda w: w.flatten())


def _mask(pruned: nn.Module, base: nn.Module, name: str, kept: torch.Tensor) -> None:
    """Give layer `name` of the copy a torch.nn.utils.prune mask that keeps the weights `kept` (flat indices)."""
    weight = weight_of(base, name)
    mask = torch.zeros(weight.numel(), device=weight.device)
    mask[kept.to(weight.device)] = 1
    torch_prune.custom_from_mask(pruned.get_submodule(name), "weight", mask.view_as(weight))


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the masks permanent (`torch.nn.utils.prune.remove`): plain weights with zeros, in place."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model


def direct_counts(pruned: nn.Module, example_inputs: torch.Tensor) -> tuple[float, int]:
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
        params += int(owner.get_buffer("weight_mask").sum()) if name.endswith("weight_orig") else p.numel()
    return flops, params


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


class Unstructured:
    """Unstructured pruning: masks on single weights, dense shapes (the gain is size, not speed)."""

    name, title, units = "unstructured", "unstructured pruning", "single weights"
    criteria: tuple[str, ...] = ("l1", "l2", "random")
    comparable = True  # weight magnitudes compare across layers as they are (global magnitude pruning)
    latency = False  # dense kernels run the zeros: a latency table of channel counts says nothing
    round_to = False
    sparsity: SparsityTraining | None = None
    report_note: str | None = (
        "Unstructured pruning: the pruned weights are zeros in dense tensors, and dense kernels do not run them "
        "faster, so latency is the dense network's; FLOPs and params count non-zero weights only. The gain is size: "
        "`final/rankN.pt` stores each pruned weight tensor as a bit mask plus its non-zero values.")

    space = staticmethod(unstructured_space)
    importance = staticmethod(weight_importance)

    def preflight(self, model: nn.Module, example_inputs: torch.Tensor, options: PreflightOptions) -> Verdict:
        """Build the space and prove it: the masked networks run, have the right output width, and their directly
        counted FLOPs and params equal the space's."""
        return prove(self, model, example_inputs, options, direct_counts, "a direct count of its non-zero weights")

    def plan(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0) -> UnitPlan:
        """Masks that keep each tensor's most important weights (`weight_orig` * `weight_mask`; fine-tuning
        keeps them)."""
        return UnitPlan(model, space, weight_importance(model, space, criterion, seed), _mask)

    def deployable(self, model: nn.Module) -> nn.Module:
        """The masks made permanent: plain weights with zeros, in place."""
        return remove_masks(model)

    def pack(self, model: nn.Module) -> dict:
        """Masked weights as packed bit masks plus their non-zero values: the file's size is the sparse size."""
        return sparse_state(model)

    def unpack(self, state: dict) -> dict:
        """The masked state dict (`weight_orig`, `weight_mask`) of a packed one."""
        return dense_state(state)


METHOD = Unstructured()
