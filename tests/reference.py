"""Torch-Pruning as the reference the fast pruner is held to (used by the tests only)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch_pruning as tp

from prunetune import PrunePlan, PruningSpace


def _root_member(group):
    return next(m for m in group.members if m.module == group.root and m.role == "out")


def torch_pruning_surgery(model, space: PruningSpace, plan: PrunePlan, ratios):
    """A deep copy of `model` with the channels the plan removes removed by Torch-Pruning's own dependency graph."""
    pruned = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(pruned, space.example_input(), verbose=False)
    modules = dict(pruned.named_modules())
    for group, mask in zip(space.groups, plan.pruned_units(ratios)):
        root = _root_member(group)
        idxs = root.idxs[mask[root.units]].tolist()
        if idxs:
            layer = modules[group.root]
            graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs).prune()
    return pruned


class _PlanRanking:
    """A Torch-Pruning importance that ranks a group's channels as the plan does."""

    def __init__(self, space: PruningSpace, plan: PrunePlan):
        self.groups = {g.root: (_root_member(g), order) for g, order in zip(space.groups, plan.order)}

    def __call__(self, group) -> torch.Tensor:
        member, order = self.groups[group._DG._module2name[group[0].dep.target.module]]
        rank = np.empty(len(order))
        rank[order] = np.arange(len(order))
        importance = torch.zeros(len(group[0].idxs))
        importance[torch.as_tensor(member.idxs)] = torch.as_tensor(rank[member.units], dtype=torch.float32)
        return importance


def metapruner(model, space: PruningSpace, plan: PrunePlan, ratios):
    """Torch-Pruning's MetaPruner with the plan's ranking: its own count of kept channels and its own surgery."""
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    pruner = tp.pruner.MetaPruner(
        pruned, space.example_input(), importance=_PlanRanking(space, plan), pruning_ratio=0.0,
        pruning_ratio_dict={modules[g.root]: float(r) for g, r in zip(space.groups, ratios)},
        ignored_layers=[modules[n] for n in space.ignored_layers],
        round_to=space.round_to if space.round_to > 1 else None)
    pruner.step()
    return pruned
