"""The importances the baselines' global thresholds rank units by (`baselines.Ranking`), computed in the driver from
the base model: the search's criterion (`global threshold`), and for channel groups Torch-Pruning's group L1
(`global-l1-normalised`), group Taylor from a few training batches' gradients (`global-taylor`), the mean
|gamma| of each group's BatchNorms (`global-bn-scale`), and the path of Torch-Pruning's iterative global L1 pruning
(`global-l1-iterative`)."""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from prunetune.workers.criteria import BATCHNORM, CRITERIA, NORM_KINDS, TAYLOR_KINDS, group_importance, loss_gradients
from prunetune.workers.data import iterate_batches
from prunetune.workers.methods import METHODS
from prunetune.workers.splits import splits_of

from .baselines import Ranking, kept_ratios
from .prepare import Checked
from .sampler import StrategySampler

TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # training images (not held out) whose loss gradients Taylor reads
ITERATIVE_STEPS = 200  # Torch-Pruning's iterative steps from no channel to search.max_ratio of them pruned


def taylor_importance(prep: Checked) -> list[np.ndarray] | None:
    """Group Taylor importance of the base model, from its loss gradients over TAYLOR_BATCHES seeded batches of the
    training split without the held-out and validation images (evaluation.seed); None, and no gradient computed,
    where a group has no weights it reads."""
    model, groups, e = prep.model, prep.space.groups, prep.cfg.evaluation.settings()
    if group_importance(model, groups, TAYLOR_KINDS) is None:
        return None
    rest = splits_of(len(prep.data.train), e).rest
    images = np.resize(rest, TAYLOR_BATCHES * TAYLOR_BATCH_SIZE)  # wraps round a small training split
    gradients = loss_gradients(model, iterate_batches(prep.data.train, images, TAYLOR_BATCH_SIZE), prep.task.select,
                               prep.task.loss)
    return group_importance(model, groups, TAYLOR_KINDS, gradients)


def _zero(model: nn.Module, group, positions: np.ndarray) -> None:
    """Zero the weights of every dimension of `group` at its block `positions` (in place): what Torch-Pruning's
    group L1 no longer reads once it has removed those channels. A grouped conv's input dimension (its weight holds
    in_channels / groups inputs per filter) is left: its filters of those channels are zeroed as outputs."""
    modules = dict(model.named_modules())
    units = np.concatenate([positions + b * (group.units // group.blocks) for b in range(group.blocks)])
    for m in group.members:
        layer = modules.get(m.module)
        weight, axis = getattr(layer, "weight", None), 0 if m.role == "out" else 1
        if not isinstance(weight, torch.Tensor) or weight.dim() <= axis or axis and getattr(layer, "groups", 1) > 1:
            continue
        idxs = torch.as_tensor(m.idxs[np.isin(m.units, units)])
        with torch.no_grad():
            weight.index_fill_(axis, idxs, 0.0)


def iterative_kept(model: nn.Module, sampler: StrategySampler, steps: int = ITERATIVE_STEPS) -> np.ndarray | None:
    """The block positions each group keeps ([S, G], one row per step) under Torch-Pruning's iterative global
    pruning, `MetaPruner(global_pruning=True, importance=GroupMagnitudeImportance(p=1), pruning_ratio=max_ratio,
    iterative_steps=steps, max_pruning_ratio=max_ratio)`, on the space's groups without Torch-Pruning: each step
    reads the group L1 of the channels left (those pruned zeroed in a copy of `model`), divides it by its group's
    mean over them, and prunes every channel at or under the global threshold that leaves int(total * (1 - ratio))
    channels of the groups still open (a group closes once it keeps under (1 - max_ratio) of its channels, or one).
    It stops at the step below the lowest band. None where a group has no weight the L1 reads."""
    groups, max_ratio = sampler.space.groups, sampler.max_ratio
    work = copy.deepcopy(model).eval()
    alive = [np.ones(g.units // g.blocks, dtype=bool) for g in groups]
    total, lowest = sum(len(a) for a in alive), sampler.bands[0][0]
    rows = []
    for step in range(1, steps + 1):
        importance = group_importance(work, groups)
        if importance is None:  # at the first step only: zeroing keeps the weights it reads
            return None
        open_ = [i for i, a in enumerate(alive)
                 if a.sum() >= len(a) * (1 - max_ratio) and a.sum() * groups[i].blocks > 1]
        if not open_:
            break
        scores = [importance[i][alive[i]] / max(importance[i][alive[i]].mean(), 1e-12) for i in open_]
        pruned = sum(len(s) for s in scores) - int(total * (1 - step / steps * max_ratio))
        if pruned > 0:
            threshold = np.partition(np.concatenate(scores), pruned - 1)[pruned - 1]
            for i, score in zip(open_, scores):
                gone = np.flatnonzero(alive[i])[score <= threshold]
                alive[i][gone] = False
                _zero(work, groups[i], gone)
        rows.append([a.sum() for a in alive])
        if sampler.measure(kept_ratios(sampler, np.array(rows[-1:])))[0] < lowest:
            break
    return np.array(rows, dtype=np.float64)


def rankings(prep: Checked, names: tuple[str, ...]) -> list[Ranking]:
    """The Ranking of each global rule among `names`, in their order (each computed only when named)."""
    s = prep.cfg.search
    method, groups = METHODS[s.granularity], prep.space.groups
    rules: dict[str, tuple[Callable[[], list[np.ndarray] | None], bool]] = {
        "global threshold": (lambda: method.importance(prep.model, prep.space, s.criterion, prep.cfg.evaluation.seed),
                             method.comparable or CRITERIA[s.criterion].source == BATCHNORM),
        "global-l1-normalised": (lambda: group_importance(prep.model, groups), False),
        "global-taylor": (lambda: taylor_importance(prep), False),
        "global-bn-scale": (lambda: group_importance(prep.model, groups, NORM_KINDS), True)}
    paths = {"global-l1-iterative": lambda: iterative_kept(prep.model, prep.sampler)}

    def ranking(name: str) -> Ranking:
        if name in paths:
            return Ranking(name, None, False, paths[name]())
        return Ranking(name, rules[name][0](), rules[name][1])
    return [ranking(name) for name in names if name in rules or name in paths]
