"""Channel pruning (EagleEye's): a ratio removes the least important filters of a channel group, for real.

The group's producer filters are ranked by the criterion (`prune.position_importance`), the pruned network is a
smaller dense copy (`prune.PrunePlan`), and the preflight proves the space against fvcore on pruned networks
(`preflight.preflight`). Network Slimming's L1 on BatchNorm scales is its sparsity training.
"""
from __future__ import annotations

from ..preflight import preflight
from ..prune import PrunePlan, position_importance
from ..space import PruningSpace
from ..sparsity import bn_scales, slimming_train
from .protocol import SparsityTraining, as_deployed, as_stored, plain_state


class Channel:
    """Channel (filter) pruning: the pruned network is a smaller dense one."""

    name, title, units = "channel", "channel pruning", "channels"
    criteria: tuple[str, ...] = ("l1", "l2", "bn_scale", "random")
    comparable = False  # filter norms differ in scale between layers: the global threshold normalises per group
    latency = True
    round_to = True
    sparsity: SparsityTraining | None = SparsityTraining("Network Slimming", "|gamma|", bn_scales, slimming_train,
                                                         needs_batchnorm=True, criterion="bn_scale")
    report_note: str | None = None

    space = staticmethod(PruningSpace.from_model)
    preflight = staticmethod(preflight)
    importance = staticmethod(position_importance)
    plan = staticmethod(PrunePlan)
    deployable, pack, unpack = staticmethod(as_deployed), staticmethod(plain_state), staticmethod(as_stored)


METHOD = Channel()
