"""What the methods that prune single units of one layer share (unstructured weights, stripes).

Their space has one group per layer whose units each carry an equal share of the layer's fvcore FLOPs and
weight, so FLOPs and params are linear in the kept units (`linear_space`); a strategy keeps the most important
units of each layer (`UnitPlan`), and the preflight counts the pruned networks directly (`prove`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..criteria import CRITERIA
from ..groups import Group, SpaceError, find_heads, refuse_compiled
from ..layers import weight_of
from ..preflight import (PreflightOptions, Verdict, as_refusal, check_output, output_shapes, strategies_to_prove,
                         within_tolerance)
from ..prune import clone_module
from ..space import PruningSpace, count_flops, own_flops
from .protocol import PruningMethod, criterion_misuse


def linear_space(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: list[str] | None,
                 select: Callable[[nn.Module, list[str]], list[str]], units_of: Callable[[nn.Module], int],
                 nothing: str, unit: str) -> PruningSpace:
    """A space with one group per selected layer whose units (`units_of`) each carry an equal share of the
    layer's fvcore FLOPs and weight: FLOPs and params are linear in the kept units."""
    model.eval()
    heads = find_heads(model, example_inputs)
    ignored = heads + [n for n in ignored_layers or [] if n not in heads]
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
    groups = [Group(n, int(u), [], root=n) for n, u in zip(names, units)]
    g = len(groups)
    dim_const = np.zeros(g + 1)
    dim_const[0] = 1.0  # row 0 is the constant 1; row i + 1 is group i's kept units
    dim_matrix = np.vstack([np.zeros(g), np.eye(g)])
    rows, zeros = np.arange(1, g + 1, dtype=np.int64), np.zeros(g, dtype=np.int64)
    flops_terms = (float(total - flops.sum()), flops / units, rows, zeros)
    params_terms = (float(base_params - weights.sum()), weights / units, rows, zeros)
    space = PruningSpace(groups, total, base_params, dim_const, dim_matrix, flops_terms, params_terms, 1, ignored,
                         tuple(example_inputs.shape[1:]))
    space.unit = unit
    return space


def layer_importance(model: nn.Module, space: PruningSpace, criterion: str, seed: int, method: PruningMethod,
                     rows: Callable[[torch.Tensor], torch.Tensor]) -> list[np.ndarray]:
    """Per layer (group), the importance of each unit: the criterion on `rows(weight)`, one row per unit."""
    problem = criterion_misuse(method, criterion)
    if problem:
        raise SpaceError(problem)
    return [CRITERIA[criterion](rows(weight_of(model, g.name).detach()), seed, g.name)
            for g in space.groups]


class UnitPlan:
    """Turns a strategy into a copy of the base model where each layer keeps its most important units;
    `keep(pruned_model, base_layer_name, kept_unit_indices)` changes one layer of the copy."""

    def __init__(self, model: nn.Module, space: PruningSpace, importance: list[np.ndarray],
                 keep: Callable[[nn.Module, nn.Module, str, torch.Tensor], None]):
        self.model, self.space, self.keep = model, space, keep
        self.order = [torch.from_numpy(np.argsort(imp, kind="stable")) for imp in importance]  # least important first

    def kept(self, ratios) -> list[torch.Tensor]:
        """Per layer, the indices of the units the strategy keeps (the most important)."""
        return [order[g.units - k:] for g, k, order in zip(self.space.groups, self.space.kept_units(ratios),
                                                             self.order)]

    def apply(self, ratios) -> nn.Module:
        """A copy of the base model with each layer keeping only the strategy's units."""
        pruned = clone_module(self.model, {})
        for g, kept in zip(self.space.groups, self.kept(ratios)):
            self.keep(pruned, self.model, g.name, kept)
        return pruned


def fvcore_counts(pruned: nn.Module, example_inputs: torch.Tensor) -> tuple[float, int]:
    """fvcore's FLOPs and the parameter count of a pruned network."""
    return count_flops(pruned, example_inputs).total(), sum(p.numel() for p in pruned.parameters())


def prove(method: PruningMethod, model: nn.Module, example_inputs: torch.Tensor, options: PreflightOptions,
          count: Callable[[nn.Module, torch.Tensor], tuple[float, int]], counted_by: str) -> Verdict:
    """The preflight of a method whose every unit prunes alike: build its space, then on the most pruned and the
    first strategy the pruned network runs with outputs of the base's shapes, and `count(pruned, example_inputs)`
    (FLOPs, params) equals the space's."""
    refuse_compiled(model)
    check_output(model, example_inputs, options.num_classes, options.task)
    shapes = output_shapes(model, example_inputs)
    space = as_refusal(model, method.space, model, example_inputs, options.round_to, list(options.ignored_layers))
    plan = method.plan(model, space)
    checked = []
    for name, ratios in strategies_to_prove(space, options.max_ratio, options.first).items():
        pruned = plan.apply(ratios)
        if output_shapes(pruned, example_inputs) != shapes:
            raise SpaceError(f"model: the {name} strategy changes the shape of an output")
        flops, params = count(pruned, example_inputs)
        if not within_tolerance(space.flops(ratios), flops) or params != space.params(ratios):
            raise SpaceError(f"model: the {name} strategy is not modelled exactly (FLOPs {space.flops(ratios):,} by "
                             f"the space, {flops:,.0f} by {counted_by}; params {space.params(ratios):,} and "
                             f"{params:,})")
        checked.append((name, space.flops(ratios), space.params(ratios)))
    return Verdict(space, [], checked, counted_by)
