"""The importances the baselines' global thresholds rank units by (`baselines.Ranking`), computed in the driver from
the base model: the search's criterion (`global threshold`), and for channel groups Torch-Pruning's group L1
(`global-l1-normalised`), group Taylor from a few training batches' gradients (`global-taylor`) and the mean
|gamma| of each group's BatchNorms (`global-bn-scale`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from prunetune.workers.criteria import BATCHNORM, CRITERIA, NORM_KINDS, TAYLOR_KINDS, group_importance, loss_gradients
from prunetune.workers.data import iterate_batches
from prunetune.workers.methods import METHODS
from prunetune.workers.splits import splits_of

from .baselines import Ranking
from .prepare import Checked

TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # training images (not held out) whose loss gradients Taylor reads


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
    return [Ranking(name, rules[name][0](), rules[name][1]) for name in names if name in rules]
