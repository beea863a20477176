"""Layer kinds: how prunetune reads, counts and slices each kind of layer, in one table.

A kind says how many channels a layer's `out` and `in` dimensions have (one coupled dimension for depthwise
convs and norms), which dimensions its own FLOPs and its weight scale with (other parameters scale with
`out`), which tensors to slice when a dimension is pruned, which attributes to set afterwards, and into how
many blocks its channels fall (grouped convs, GroupNorm: every block must keep the same channels). Adding a
layer type is one entry in KINDS, the way Torch-Pruning registers one pruner per layer type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeGuard, cast

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

OUT, IN = "out", "in"
PRODUCERS = ("conv", "grouped_conv", "conv_transpose", "linear")  # kinds whose out channels are filters of their own


@dataclass(frozen=True)
class LayerKind:
    """What prunetune knows about one kind of layer."""

    name: str
    matches: Callable[[nn.Module], bool]
    size: Callable[[nn.Module, str], int]  # channels of the out | in dimension
    tensors: Callable[[nn.Module, str], list[tuple[str, int]]]  # (tensor attribute, axis) to slice for out | in
    resize: Callable[[nn.Module, str, int], None]  # set the layer's channel attributes after slicing
    coupled: bool = True  # in and out are one dimension (one `out` member)
    flops_roles: tuple[str, ...] = (OUT,)  # dimensions the layer's own FLOPs scale with
    weight_roles: tuple[str, ...] = (OUT,)  # dimensions its `weight` scales with (other parameters: out)
    blocks: Callable[[nn.Module], int] = lambda m: 1  # channel blocks that must keep the same channels
    local_index: Callable[[nn.Module, str, np.ndarray], np.ndarray] = lambda m, role, keep: keep  # keep -> axis


def _is_conv(m: nn.Module) -> TypeGuard[_ConvNd]:
    return isinstance(m, _ConvNd) and not m.transposed


def _is_depthwise(m: nn.Module) -> bool:
    return _is_conv(m) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_size(m, role: str) -> int:
    return m.out_channels if role == OUT else m.in_channels


def _conv_tensors(m, role: str) -> list[tuple[str, int]]:
    if role == IN:
        return [("weight", 1)]
    return [("weight", 0)] + ([("bias", 0)] if m.bias is not None else [])


def _transposed_tensors(m, role: str) -> list[tuple[str, int]]:
    # a transposed conv's weight is [in, out / groups, k, k]: its filters are along axis 1
    if role == IN:
        return [("weight", 0)]
    return [("weight", 1)] + ([("bias", 0)] if m.bias is not None else [])


def _conv_resize(m, role: str, n: int) -> None:
    setattr(m, "out_channels" if role == OUT else "in_channels", n)


def _depthwise_resize(m, role: str, n: int) -> None:
    m.in_channels = m.out_channels = m.groups = n


def _grouped_local_index(m, role: str, keep: np.ndarray) -> np.ndarray:
    # A grouped conv's weight holds in_channels / groups inputs per filter; the kept inputs repeat in every block.
    return keep[: len(keep) // m.groups] if role == IN else keep


def _linear_size(m, role: str) -> int:
    return m.out_features if role == OUT else m.in_features


def _linear_resize(m, role: str, n: int) -> None:
    setattr(m, "out_features" if role == OUT else "in_features", n)


def _norm_tensors(m, role: str) -> list[tuple[str, int]]:
    names = ["weight", "bias"] if getattr(m, "affine", False) else []
    if getattr(m, "track_running_stats", False) and m.running_mean is not None:
        names += ["running_mean", "running_var"]
    return [(n, 0) for n in names]


def _affine_tensors(m, role: str) -> list[tuple[str, int]]:
    return [(n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]


def _layernorm_resize(m, role: str, n: int) -> None:
    m.normalized_shape = (n,)


KINDS: tuple[LayerKind, ...] = (
    LayerKind("conv", lambda m: _is_conv(m) and m.groups == 1, _conv_size, _conv_tensors, _conv_resize,
              coupled=False, flops_roles=(OUT, IN), weight_roles=(OUT, IN)),
    LayerKind("dwconv", _is_depthwise, _conv_size, _conv_tensors, _depthwise_resize),
    LayerKind("conv_transpose", lambda m: isinstance(m, _ConvNd) and m.transposed and m.groups == 1, _conv_size,
              _transposed_tensors, _conv_resize, coupled=False, flops_roles=(OUT, IN), weight_roles=(OUT, IN)),
    LayerKind("grouped_conv", lambda m: _is_conv(m) and m.groups > 1 and not _is_depthwise(m), _conv_size,
              _conv_tensors, _conv_resize, coupled=False, flops_roles=(OUT, IN), weight_roles=(OUT, IN),
              blocks=lambda m: cast(_ConvNd, m).groups, local_index=_grouped_local_index),
    LayerKind("linear", lambda m: isinstance(m, nn.Linear), _linear_size,
              lambda m, role: _conv_tensors(m, role), _linear_resize, coupled=False, flops_roles=(OUT, IN),
              weight_roles=(OUT, IN)),
    # a kind's other functions are called only on the layers its `matches` accepts: the casts say which those are
    LayerKind("batchnorm", lambda m: isinstance(m, (_BatchNorm, _InstanceNorm)),
              lambda m, role: cast(_NormBase, m).num_features, _norm_tensors,
              lambda m, role, n: setattr(m, "num_features", n)),
    LayerKind("groupnorm", lambda m: isinstance(m, nn.GroupNorm), lambda m, role: cast(nn.GroupNorm, m).num_channels,
              _affine_tensors, lambda m, role, n: setattr(m, "num_channels", n),
              blocks=lambda m: cast(nn.GroupNorm, m).num_groups),
    LayerKind("layernorm", lambda m: isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1,
              lambda m, role: cast(nn.LayerNorm, m).normalized_shape[0], _affine_tensors, _layernorm_resize),
    LayerKind("prelu", lambda m: isinstance(m, nn.PReLU) and m.num_parameters > 1,
              lambda m, role: cast(nn.PReLU, m).num_parameters, lambda m, role: [("weight", 0)],
              lambda m, role, n: setattr(m, "num_parameters", n)),
)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a layer, or None for a module prunetune does not prune (containers, unknown layers)."""
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


def layer_kind(module: nn.Module) -> LayerKind:
    """The kind of a layer prunetune prunes (a group's member is one); ValueError for any other module."""
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a layer prunetune prunes")
    return kind


def is_stateless(module: nn.Module) -> bool:
    """A leaf module with nothing per channel: no parameters (pooling, activation, dropout), or PReLU's one shared
    slope (nothing to slice; the slope is a fixed parameter). It follows its input's channels."""
    if list(module.children()):
        return False
    return not list(module.parameters(recurse=False)) or isinstance(module, nn.PReLU) and module.num_parameters == 1


def weight_of(model: nn.Module, name: str = "") -> torch.Tensor:
    """The `weight` tensor of layer `name` of `model` (the model's own without a name; typed: torch annotates a
    module's attributes as Tensor | Module)."""
    return cast(torch.Tensor, model.get_submodule(name).weight)
