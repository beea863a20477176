"""Channel groups of a model, found with Torch-Pruning's DependencyGraph, as plain picklable data.

A group is a set of coupled channels pruned together with one ratio. Its channels ("units") are the classes
of Torch-Pruning root channels that always go together: usually one root channel each, two for a GhostNet
module whose depthwise half copies the primary half. Every layer dimension in a group (a `Member`) follows
the units, the same number of its channels per unit, so the channels a layer keeps are linear in the units a
group keeps, whatever the ranking. A group where that does not hold (a channel split or a slice that only part
of the group reaches) is not a valid group and is reported instead. A chunk of the channels into equal parts
(YOLO's C2f: `cv1(x).chunk(2, 1)`, its halves consumed differently) is the exception: the group splits into as
many blocks, each keeping the same units, so that after pruning the chunk still splits where the parts meet.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .errors import BadInput
from .layers import IN, OUT, PRODUCERS, is_stateless, kind_of, layer_kind
from .tasks import output_tensors

OP, PARAMETER = "op", "parameter"  # member kinds beside the layer kinds: stateless leaf module, bare nn.Parameter


class SpaceError(BadInput, ValueError):
    """A model or strategy that does not fit the pruning space."""


@dataclass(frozen=True)
class Member:
    """One layer dimension a group prunes.

    `module` is the layer's name (for a bare parameter, the parameter's name); `kind` is a layer kind, `op` or
    `parameter`; `role` is `out` or `in`; `idxs` are the dimension's indices governed by this group and `units`
    the group unit each of them follows; `axis` is the pruned axis of a bare parameter; `per_unit` its channels
    per group unit (1 for most layers, 2 after a GhostNet concat, 1/2 for a layer that sees one half of a chunk).
    """

    module: str
    kind: str
    role: str
    idxs: np.ndarray
    units: np.ndarray
    axis: int = 0
    per_unit: float = 1.0


@dataclass
class Group:
    """A set of units pruned together with one ratio: coupled channels (channel pruning), or the weights or
    stripes of one layer (methods that prune within a layer, whose groups have no members).

    A channel group is named after its producer (the first conv/linear, in model order, whose filters it
    prunes); `root` is the layer Torch-Pruning enumerates it by. `blocks` > 1 when a grouped conv, GroupNorm or an
    equal chunk splits the channels into blocks that must keep the same units (unit u is position
    u % (units / blocks) of block u // (units / blocks)). `part_sizes` are the (module, integer attribute) that hold
    the part size of an equal split by sizes the group's channels go through (C2PSA's `split((self.c, self.c))`):
    the pruned copy gets the pruned part size there.
    """

    name: str
    units: int
    members: list[Member] = field(repr=False)
    root: str = ""
    blocks: int = 1
    flops_share: float = 0.0
    part_sizes: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Trace:
    """Torch-Pruning's dependency graph of a model plus what prunetune needs to name its nodes."""

    graph: Any  # torch_pruning.DependencyGraph (Torch-Pruning has no type information)
    groups: list  # (root module, Torch-Pruning group)
    names: dict  # module -> name
    param_names: dict  # parameter -> name
    param_axes: dict  # parameter -> the axis Torch-Pruning prunes
    owners: dict  # grad_fn -> the stateless leaf module call that produced it (name, then name#2, ...)
    channels: dict  # stateless leaf call -> channels of its output
    aliases: dict  # stateless leaf that passed its input on -> the call whose output (and channels) it is
    channel_ops: dict  # grad_fn -> what a channel shuffle, fixed-size split or heads reshape does where (not followed)
    norm_blocks: dict  # grad_fn of a functional group_norm -> (its group count, where): the channels split into blocks
    chunk_parts: dict  # grad_fn of one part of an equal chunk -> (where, the part, the part count)
    sized: dict  # where an equal split by sizes is -> (module, the integer attribute holding the part size)
    attention: dict  # module that reshapes channels into attention heads -> why no group reaching a layer in it is kept


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Track which modules' forwards are running (innermost last), e.g. to name where a forward failed."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(m, args):
        stack.append(names[m])

    def leave(m, args, out):
        if stack and stack[-1] == names[m]:
            stack.pop()

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield stack
    finally:
        for h in hooks:
            h.remove()


def dim_size(model: nn.Module, member: Member, op_channels: dict[str, int] | None = None) -> int:
    """Channels of the layer dimension a member is (a stateless op's from the channels seen when tracing)."""
    if member.kind == OP:
        if op_channels is None:
            raise ValueError(f"dim_size: op {member.module}'s channels are known from tracing only (op_channels)")
        return op_channels[member.module]
    if member.kind == PARAMETER:
        return model.get_parameter(member.module).shape[member.axis]
    module = model.get_submodule(member.module)
    return layer_kind(module).size(module, member.role)


def describe_module(model: nn.Module, name: str) -> str:
    """`name (Type)` for messages; the model itself is `model (Type)`."""
    return f"{name or 'model'} ({type(model.get_submodule(name)).__name__})"


def find_heads(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the heads, never pruned: the last Conv/Linear layer run in the forward pass (the classifier), then
    every other Conv/Linear layer whose output reaches one of the model's outputs (an aux classifier, a box head)
    through no other Conv/Linear layer."""
    order: list[str] = []
    made: dict = {}  # grad_fn of a layer's output -> the layer

    def seen(m, i, o, n):
        order.append(n)
        if isinstance(o, torch.Tensor) and o.grad_fn is not None:
            made[o.grad_fn] = n

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen(m, i, o, n))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.enable_grad():
            out = model.eval()(example_inputs.detach().clone().requires_grad_(example_inputs.is_floating_point()))
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise SpaceError("model: no Conv or Linear layer found to prune")
    heads, visited = [order[-1]], set()
    stack: list[torch.autograd.graph.Node | None] = [t.grad_fn for t in output_tensors(out) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if node in made:
            heads += [made[node]] if made[node] not in heads else []
            continue
        stack += [next_node for next_node, _ in node.next_functions]
    return heads


class _ChannelOps:
    """Records the modules whose forward moves a feature map's channels in a way pruning cannot follow: into groups
    (a channel shuffle, by reshape or by op), into pixels (PixelShuffle), into parts of fixed size (their sizes are
    numbers in the module, not the tensor's) or into and out of attention heads (a reshape of [N, C, H, W] to
    [N, heads, C / heads, H * W] and back, as YOLO11's C2PSA does for q, k and v); the group count of every
    functional group_norm, which a group's kept channels must split into, as a GroupNorm layer's; and every chunk of
    the channels into equal parts, which it runs as slices (Torch-Pruning maps a slice's channels; a chunk's parts it
    confuses when they meet again)."""

    RESHAPES = {"view", "reshape", "unflatten"}
    SPLITS = {"split", "split_with_sizes", "chunk", "tensor_split"}
    SHUFFLES = {"channel_shuffle": "shuffles the channels (a channel shuffle)",
                "native_channel_shuffle": "shuffles the channels (a channel shuffle)",
                "pixel_shuffle": "moves channels into pixels (a PixelShuffle)",
                "pixel_unshuffle": "moves pixels into channels (a PixelUnshuffle)"}

    def __init__(self, model: nn.Module):
        self.model = model
        self.found: dict = {}  # grad_fn of the op's output -> "module (Type) does what"
        self.windows: dict = {}  # "found" -> the first module that reshapes feature maps into windows
        self.blocks: dict = {}  # grad_fn of a functional group_norm's output -> (its number of groups, where)
        self.parts: dict = {}  # grad_fn of one part of an equal chunk -> (where, the part, the part count)
        self.sized: dict = {}  # where an equal split by sizes is -> (module, the attribute holding the part size)
        self.cats: dict = {}  # grad_fn of a concat of feature maps' channels -> the channels of each input
        self.heads: set = set()  # grad_fns of the reshapes into and out of attention heads
        self.attention: dict = {}  # the module that does them -> "module (Type) does what"

    def refuse_windows(self) -> None:
        """SpaceError naming the first module that reshaped feature maps into windows, if one did: Torch-Pruning's
        index mappings grow without bound through them (or its trace fails on them, as on Swin-S and Swin-B)."""
        if self.windows:
            raise SpaceError(f"model: {self.windows['found']}, which channel pruning cannot follow") from None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Record during the forward passes run inside this context."""
        from torch.overrides import TorchFunctionMode

        found, windows, blocks, parts, cats, heads, sized, attention, model = (
            self.found, self.windows, self.blocks, self.parts, self.cats, self.heads, self.sized, self.attention,
            self.model)
        modules = dict(model.named_modules())
        chunks: dict[str, int] = {}

        class Watch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                x, name = (args[0] if args else None), getattr(func, "__name__", "")
                count, attribute = _equal_parts(name, args, kwargs, modules[stack[-1]] if stack else None)
                if count and stack:
                    size = x.shape[1] // count
                    out = tuple(x[:, i * size:(i + 1) * size] for i in range(count))
                    where = describe_module(model, stack[-1])
                    chunks[where] = chunks.get(where, 0) + 1  # a module that chunks twice: each chunk on its own
                    where += f" (its chunk {chunks[where]})" if chunks[where] > 1 else ""
                    parts.update({t.grad_fn: (where, i, count) for i, t in enumerate(out) if t.grad_fn is not None})
                    if attribute:
                        sized[where] = (stack[-1], attribute)
                    return out
                out = func(*args, **kwargs)
                if name in ("cat", "concat", "concatenate") and isinstance(out, torch.Tensor) and out.dim() == 4 and \
                        out.grad_fn is not None and kwargs.get("dim", args[1] if len(args) > 1 else 0) in (1, -3):
                    cats[out.grad_fn] = [t.shape[1] for t in kwargs.get("tensors", x)]
                if not (isinstance(x, torch.Tensor) and x.dim() in (3, 4) and stack):
                    return out
                if name == "group_norm" and isinstance(out, torch.Tensor) and out.grad_fn is not None:
                    blocks[out.grad_fn] = (int(kwargs.get("num_groups", args[1] if len(args) > 1 else 1)),
                                           f"the group_norm in {describe_module(model, stack[-1])}")
                what = _ChannelOps.SHUFFLES.get(name)
                if what is None and name in _ChannelOps.RESHAPES and isinstance(out, torch.Tensor) and out.dim() >= 6:
                    windows.setdefault("found", f"{describe_module(model, stack[-1])} reshapes feature maps into "
                                                "windows or pixel blocks (as Swin, MaxViT, pixel unshuffle do)")
                elif what is None and name in _ChannelOps.RESHAPES and isinstance(out, torch.Tensor) and \
                        x.dim() == 4 and out.dim() > 4 and out.shape[1] * out.shape[2] == x.shape[1]:
                    what = "reshapes the channels into groups (a channel shuffle)"
                elif what is None and name in _ChannelOps.RESHAPES and isinstance(out, torch.Tensor) and \
                        _heads_reshape(x, out) and out.grad_fn is not None:
                    what = "reshapes the channels into and out of attention heads"
                    heads.add(out.grad_fn)
                    attention.setdefault(stack[-1], f"{describe_module(model, stack[-1])} {what}")
                elif what is None and x.dim() == 4 and name in _ChannelOps.SPLITS and \
                        kwargs.get("dim", args[2] if len(args) > 2 else 0) in (1, -3):
                    what = "splits the channels into parts of fixed size"
                for t in (out if isinstance(out, (tuple, list)) else [out]) if what else []:
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        found.setdefault(t.grad_fn, f"{describe_module(model, stack[-1])} {what}")
                return out

        with module_stack(model) as stack, Watch():
            yield


def _heads_reshape(x: torch.Tensor, out: torch.Tensor) -> bool:
    """True for a reshape of a feature map [N, C, H, W] into attention heads [N, heads, C / heads, H * W], or back."""
    if x.dim() != 4 or out.dim() != 4 or x.shape == out.shape or x.shape[0] != out.shape[0]:
        return False
    into = out.shape[1] * out.shape[2] == x.shape[1] and out.shape[3] == x.shape[2] * x.shape[3]
    back = x.shape[1] * x.shape[2] == out.shape[1] and x.shape[3] == out.shape[2] * out.shape[3]
    return into or back


_SIZES = ("split_size_or_sections", "split_size", "split_sizes")  # the sizes' keyword in torch.split and Tensor's


def _equal_parts(name: str, args: tuple, kwargs: dict, owner: nn.Module | None) -> tuple[int, str | None]:
    """How a split of a feature map's channels into equal parts follows pruning: (part count, None) for a chunk,
    whose parts follow the channel count; (part count, attribute) for a split by sizes whose part size `owner` (the
    module that splits) holds in one integer attribute, which the pruned copy gets set; (0, None) for any other
    split, whose sizes are written in its code or unequal."""
    x = args[0] if args else None
    if name not in ("chunk", "split", "split_with_sizes") or not (isinstance(x, torch.Tensor) and x.dim() == 4) or \
            kwargs.get("dim", args[2] if len(args) > 2 else 0) not in (1, -3):
        return 0, None
    channels = x.shape[1]
    if name == "chunk":
        count = kwargs.get("chunks", args[1] if len(args) > 1 else None)
        return (count, None) if isinstance(count, int) and count > 1 and channels % count == 0 else (0, None)
    sizes = next((kwargs[k] for k in _SIZES if k in kwargs), args[1] if len(args) > 1 else None)
    if isinstance(sizes, int) and not isinstance(sizes, bool) and 0 < sizes < channels and channels % sizes == 0:
        size, count = sizes, channels // sizes
    elif isinstance(sizes, (list, tuple)) and len(sizes) > 1 and len(set(sizes)) == 1 and sum(sizes) == channels:
        size, count = sizes[0], len(sizes)
    else:
        return 0, None
    held = [k for k, v in vars(owner or nn.Module()).items() if type(v) is int and v == size]
    return (count, held[0]) if len(held) == 1 else (0, None)


# Torch-Pruning's grouping is quadratic in a group's size: some models never finish, or fill the memory. Bounded in
# CPU time (the same on a busy machine) and in the memory it adds (at most half of what is available when it starts).
GROUPING_CPU_LIMIT_S = 300
GROUPING_MEMORY_LIMIT = 4 * 2 ** 30  # resnet50 at 224 px grows it by 81 MiB
_BOUND_CHECK_EVERY_S = 0.1  # of CPU time


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _available_bytes() -> int | None:
    """Memory the system has available (Linux /proc/meminfo), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return None


@contextlib.contextmanager
def _grouping_bound(model: nn.Module) -> Iterator[None]:
    """SpaceError, saying which bound, as soon as the block has used GROUPING_CPU_LIMIT_S of CPU time or grown the
    process by more than its memory limit (checked every 0.1 s of CPU time; main thread only, elsewhere no bound)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    start_rss, start_cpu, available = _resident_bytes(), time.process_time(), _available_bytes()
    limit = min(GROUPING_MEMORY_LIMIT, available // 2) if available is not None else GROUPING_MEMORY_LIMIT
    what = f"Torch-Pruning's grouping of the channels of {type(model).__name__}"

    def check(signum, frame):
        rss = _resident_bytes()
        if start_rss is not None and rss is not None and rss - start_rss > limit:
            raise SpaceError(f"model: {what} grew the process by {(rss - start_rss) / 2 ** 30:.1f} GiB, over its "
                             f"limit of {limit / 2 ** 30:.1f} GiB (its groups grow huge through slices or reshapes of "
                             "the channels); prunetune cannot prune it")
        if time.process_time() - start_cpu > GROUPING_CPU_LIMIT_S:
            raise SpaceError(f"model: {what} did not finish within {GROUPING_CPU_LIMIT_S} s of CPU time (its groups "
                             "grow huge through slices of the channels, as in RexNet); prunetune cannot prune it")

    previous = signal.signal(signal.SIGPROF, check)
    signal.setitimer(signal.ITIMER_PROF, _BOUND_CHECK_EVERY_S, _BOUND_CHECK_EVERY_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, previous)


def refuse_compiled(model: nn.Module) -> None:
    """SpaceError naming the first submodule wrapped in torch.compile: neither Torch-Pruning nor fvcore traces one."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile imports it (seconds): if not, none exists
    if dynamo is None:
        return
    name = next((n for n, m in model.named_modules() if isinstance(m, dynamo.OptimizedModule)), None)
    if name is not None:
        raise SpaceError(f"model: {describe_module(model, name)} is wrapped in torch.compile, which Torch-Pruning and "
                         "fvcore cannot trace; build the model without torch.compile (compile the pruned model "
                         "instead)")


@contextlib.contextmanager
def _out_of_place(model: nn.Module) -> Iterator[None]:
    """Run in-place activations out of place: an in-place op on a view's output (an InstanceNorm's) hides the
    layer from Torch-Pruning's trace. The result is the same."""
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in inplace:  # a plain attribute: torch annotates a Module's attributes as tensors and modules only
        m.inplace = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in inplace:
            m.inplace = True  # type: ignore[assignment]


def trace_groups(model: nn.Module, example_inputs: torch.Tensor, ignored: list[str]) -> Trace:
    """Build Torch-Pruning's dependency graph of `model` and its groups (1-channel groups left out)."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    owners: dict = {}
    channels: dict[str, int] = {}
    calls: dict[str, int] = {}
    aliases: dict[str, str] = {}

    def record(module, inputs, output):
        if not (isinstance(output, torch.Tensor) and output.grad_fn is not None):
            return
        if output.grad_fn in owners:  # it passed its input on (Identity, a pool to its input's size): same channels
            aliases.setdefault(names[module], owners[output.grad_fn])
            return
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:  # a module used twice (one ReLU for a whole block) is one op per call
            name = f"{name}#{calls[name]}"
        owners[output.grad_fn] = name
        channels[name] = output.shape[1] if output.dim() > 1 else output.shape[0]

    hooks = [m.register_forward_hook(record) for m in model.modules() if is_stateless(m)]
    channel_ops = _ChannelOps(model)
    try:
        with torch.enable_grad(), channel_ops.watching(), _out_of_place(model):
            # a tuple: Torch-Pruning calls model(*example_inputs), which would split a bare batch into samples
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example_inputs,), verbose=False)
    except SpaceError:
        raise
    except Exception as e:
        channel_ops.refuse_windows()
        hint = f"; {next(iter(channel_ops.found.values()))}" if channel_ops.found else ""
        raise SpaceError(f"model: Torch-Pruning cannot trace the channel dependencies of {type(model).__name__} "
                         f"({error_line(e)}){hint}") from None
    finally:
        for h in hooks:
            h.remove()
    channel_ops.refuse_windows()
    _stop_at(graph, channel_ops.heads)
    if channel_ops.parts:
        _size_concats(graph, channel_ops.cats)
        _chunked_first(graph, channel_ops.parts)
    ignored_modules = [model.get_submodule(n) for n in ignored]
    roots: list[nn.Module] = []  # the layers whose groups Torch-Pruning built, the last to name if that fails
    build_group = graph.get_pruning_group

    def noted(module, *args, **kwargs):
        roots.append(module)
        return build_group(module, *args, **kwargs)

    graph.get_pruning_group = noted
    try:
        groups = [(g[0].dep.target.module, g) for g in graph.get_all_groups(ignored_layers=ignored_modules)]
    except SpaceError:
        raise
    except Exception as e:
        raise _grouping_failed(model, names.get(roots[-1]) if roots else None, e) from None
    finally:
        del graph.get_pruning_group
    groups = [(root, g) for root, g in groups if len(g[0].idxs) > 1]  # Torch-Pruning skips 1-channel groups
    axes = {u.parameters: u.pruning_dim for u in graph.unwrapped_parameters}
    return Trace(graph, groups, names, dict(graph._param_to_name), axes, owners, channels, aliases, channel_ops.found,
                 channel_ops.blocks, channel_ops.parts, channel_ops.sized, channel_ops.attention)


def _stop_at(graph, reshapes: set) -> None:
    """Map no index out of the reshapes into and out of attention heads. Torch-Pruning maps every channel there to
    H * W indices, which the attention's matmuls and transposes multiply again: YOLO11n's C2PSA at 640 px grew its
    grouping by 4 GiB in minutes of CPU. Every group that reaches a layer of the module doing them is left out naming
    it (_raw_items: the module's shapes tie its input channels to the heads', as `view(B, C, H, W)` does), so nothing
    past them need be known."""
    for node in graph.module2node.values():
        if node.grad_fn in reshapes:
            for dep in node.dependencies:
                dep.index_mapping[1] = _no_index


def _no_index(idxs: list) -> list:
    """An index mapping that maps nothing."""
    return []


def _size_concats(graph, cats: dict) -> None:
    """Map the indices through every concat of distinct inputs whose sizes Torch-Pruning infers wrong or not at all,
    from the sizes seen: it cannot infer a slice's channels (it takes the sliced tensor's), so it maps none through a
    concat of a chunk's parts or into a chunk, and merges what it should have offset."""
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    for node in graph.module2node.values():
        sizes = cats.get(node.grad_fn)
        if not sizes or len(sizes) != len({id(n) for n in node.inputs}) or node.module.offsets is not None and \
                node.module.concat_sizes == sizes:
            continue
        offsets = np.cumsum([0] + sizes).tolist()
        node.module.concat_sizes, node.module.offsets = sizes, offsets
        for i, source in enumerate(node.inputs):  # the slots Torch-Pruning's own concat mapping fills
            back = next(d for d in node.dependencies if d.target is source)
            back.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=True)
            forward = next(d for d in source.dependencies if d.target is node)
            forward.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=False)


def _chunked_first(graph, parts: dict) -> None:
    """Let the layer whose output an equal chunk splits root its group before any layer that only one part reaches
    (Torch-Pruning roots a group at each layer no earlier group reached, in the order of its graph): its group is then
    the whole chunked tensor, with everything each part reaches."""
    import torch_pruning as tp

    first = []
    for node in graph.module2node.values():
        producer = node.inputs[0] if node.grad_fn in parts and node.inputs else None
        while producer is not None and not isinstance(producer.module, (nn.modules.conv._ConvNd, nn.Linear)):
            # back through norms, activations and adds to the layer that made the chunked channels; not past a concat
            producer = producer.inputs[0] if producer.inputs and producer.type != tp.ops.OPTYPE.CONCAT else None
        if producer is not None:
            first.append(producer.module)
    order = list(dict.fromkeys(first)) + [m for m in graph.module2node if m not in first]
    graph.module2node = {m: graph.module2node[m] for m in order}


def _grouping_failed(model: nn.Module, root: str | None, e: Exception) -> SpaceError:
    """The one-line refusal for an error while grouping the channels (in Torch-Pruning's grouping, mostly), naming
    the layer whose group it was building."""
    where = f" at {describe_module(model, root)}" if root is not None else ""
    return SpaceError(f"model: grouping the channels of {type(model).__name__} fails{where} ({error_line(e)}); "
                      "prunetune cannot prune it")


def error_line(e: Exception) -> str:
    """`Type: first line of the message` (cut to 200 characters), for one-line refusals."""
    text = str(e).splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Item(NamedTuple):
    """A Torch-Pruning group item: dependency, indices of its target, and the root channel of each index."""

    dep: object
    idxs: list
    root_idxs: list


class _Irregular(Exception):
    """A Torch-Pruning group prunetune cannot model exactly; the message says why."""


# Functional ops fvcore counts, by the name of their autograd node (a global average pool runs as a mean):
# outside a layer their FLOPs still scale with the channels.
COUNTED_FUNCTIONAL = ("AdaptiveAvgPool2D", "MeanBackward", "BatchNorm", "GroupNorm", "LayerNorm", "Upsample",
                      "Convolution", "Addmm", "MmBackward", "Bmm")


def _raw_items(trace: Trace, items) -> tuple[dict[tuple, list], bool, dict[str, int], dict[str, dict]]:
    """(name, kind, role, axis) -> [(index, root index)] for every layer dimension the Torch-Pruning group items
    reach, whether they reach a functional op that fvcore counts, the blocks of the functional group_norms and equal
    chunks they reach (where -> group or part count), and what each chunk's parts hold (where -> {(part, index
    in the part): root index})."""
    raw: dict[tuple, list] = {}
    counted = False
    blocks: dict[str, int] = {}
    parts: dict[str, dict] = {}
    for item in items:
        node = item.dep.target
        target = node.module
        if node.grad_fn in trace.channel_ops:  # a channel shuffle (by reshape, or by a stateless module's op)
            raise _Irregular(trace.channel_ops[node.grad_fn])
        if node.grad_fn in trace.chunk_parts:  # one part of an equal chunk: indices within the part
            where, part, count = trace.chunk_parts[node.grad_fn]
            blocks[where] = count
            for idx, root in zip(item.idxs, item.root_idxs):
                parts.setdefault(where, {}).setdefault((part, int(idx)), int(root))
            continue
        if isinstance(target, nn.Parameter):
            key = (trace.param_names[target], PARAMETER, OUT, trace.param_axes.get(target, 0))
        elif target in trace.names:
            kind = kind_of(target)
            name = trace.names[target]
            inside = next((why for m, why in trace.attention.items() if name.startswith(f"{m}.")), None)
            if inside:
                raise _Irregular(inside)
            if kind is None:
                if is_stateless(target):
                    continue  # a stateless module Torch-Pruning tracks directly: its output is covered as `op`
                raise _Irregular(f"layer {name} ({type(target).__name__}) has no pruning rule in prunetune")
            out = kind.coupled or trace.graph.is_out_channel_pruning_fn(item.dep.handler)
            key = (name, kind.name, OUT if out else IN, 0)
        elif node.grad_fn in trace.owners:  # output of a stateless leaf module (pooling, activation)
            key = (trace.owners[node.grad_fn], OP, OUT, 0)
        else:  # functional op (add, cat, view, group_norm...): nothing to slice
            if node.grad_fn in trace.norm_blocks:
                groups, where = trace.norm_blocks[node.grad_fn]
                blocks[where] = groups
            counted = counted or any(op in type(node.grad_fn).__name__ for op in COUNTED_FUNCTIONAL)
            continue
        raw.setdefault(key, []).extend(zip(item.idxs, item.root_idxs))
    return raw, counted, blocks, parts


def _items_per_root(trace: Trace, root: nn.Module, group) -> list:
    """The group's items one root channel at a time. Torch-Pruning merges the items of a whole group by index,
    keeping one root per index, which hides that two root channels reach the same layer channel."""
    handler = group[0].dep.handler
    items = []
    for r in range(len(group[0].idxs)):
        for item in trace.graph.get_pruning_group(root, handler, [r]):
            items.append(_Item(item.dep, item.idxs, [r] * len(item.idxs)))
    return items


def _units(items: dict[tuple, list], n_roots: int) -> np.ndarray:
    """Unit of every root channel: roots that reach the same channel of some layer are one unit."""
    parent = list(range(n_roots))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for pairs in items.values():
        first: dict[int, int] = {}
        for idx, root in pairs:
            if idx in first:
                a, b = find(first[idx]), find(root)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[idx] = root
    classes = np.array([find(r) for r in range(n_roots)])
    _, unit = np.unique(classes, return_inverse=True)  # ordered by each class's smallest root
    return unit


def _check_blocks(members: list[Member], blocks: dict[str, int], units: int, lcm: int) -> None:
    """Raise _Irregular unless pruning the same units in every block prunes the same channels in every layer block."""
    size = units // lcm
    for m in members:
        b = blocks.get(m.module, 1)
        if b == 1:
            continue
        width = len(m.idxs) // b
        patterns: dict[int, set[tuple[int, int]]] = {}
        for idx, unit in zip(m.idxs, m.units):
            patterns.setdefault(idx // width, set()).add((unit % size, idx % width))
        if len({frozenset(p) for p in patterns.values()}) > 1:
            raise _Irregular(f"the channel blocks of {m.module} do not line up with the group's blocks")


def _members(items: dict[tuple, list], n_roots: int, parts: int = 1) -> tuple[list[Member], np.ndarray]:
    """The group's members and the unit of every root channel. A member must see every unit equally often; in a
    group of `parts` blocks (equal chunks), every position of a block equally often (a layer that one part of a
    chunk reaches sees one block): either way its pruned channels follow the units kept. _Irregular if not."""
    unit_of_root = _units(items, n_roots)
    n_units = int(unit_of_root.max()) + 1
    if n_units % parts:
        raise _Irregular(f"its {n_units} channels do not split into the {parts} equal parts of a chunk")
    width = n_units // parts
    members = []
    for (name, kind, role, axis), pairs in items.items():
        idx_of: dict[int, int] = {}
        for idx, root_idx in pairs:
            idx_of.setdefault(int(idx), int(unit_of_root[root_idx]))
        idxs = np.array(sorted(idx_of), dtype=np.int64)
        units = np.array([idx_of[i] for i in idxs], dtype=np.int64)
        counts = np.bincount(units % width, minlength=width)
        if counts.min() != counts.max():
            raise _Irregular(f"{name} sees only part of the group's channels (a channel split or slice)")
        members.append(Member(name, kind, role, idxs, units, axis, len(idxs) / n_units))
    return members, unit_of_root


def _check_parts(parts: dict[str, dict], counts: dict[str, int], unit_of_root: np.ndarray, blocks: int) -> None:
    """Raise _Irregular unless pruning the same positions in every block prunes as many channels of each part of
    every equal chunk the group reaches (so the pruned chunk still splits where its parts meet)."""
    width = (int(unit_of_root.max()) + 1) // blocks
    for where, seen in parts.items():
        positions = np.zeros((counts[where], width), dtype=np.int64)
        for (part, _), root in seen.items():
            positions[part, unit_of_root[root] % width] += 1
        if (positions != positions[0]).any():
            raise _Irregular(f"{where} chunks the channels into {counts[where]} equal parts, which the group's "
                             "channels do not fill alike")


def _channel_group(model: nn.Module, trace: Trace, root: nn.Module, group) -> tuple[Group, bool]:
    items, counted, blocks, parts = _raw_items(trace, group)
    chunks = math.lcm(*(blocks[where] for where in parts)) if parts else 1
    try:
        members, unit_of_root = _members(items, len(group[0].idxs), chunks)
    except _Irregular:  # maybe only Torch-Pruning's merge hid which root channels go together: look per root
        items, _, _, parts = _raw_items(trace, _items_per_root(trace, root, group))
        members, unit_of_root = _members(items, len(group[0].idxs), chunks)
    n_units = int(unit_of_root.max()) + 1
    for m in members:  # and the blocks of grouped convs and GroupNorm layers beside those of functional ops
        if m.kind not in (OP, PARAMETER):
            module = model.get_submodule(m.module)
            b = layer_kind(module).blocks(module)
            if b > 1:
                blocks[m.module] = b
    lcm = math.lcm(*blocks.values()) if blocks else 1
    if n_units % lcm:
        raise _Irregular(f"its {n_units} channels do not split into the {lcm} blocks of {', '.join(blocks)}")
    _check_blocks(members, blocks, n_units, lcm)
    _check_parts(parts, blocks, unit_of_root, lcm)
    position = {n: i for i, n in enumerate(trace.names.values())}
    producers = [m.module for m in members if m.role == OUT and m.kind in PRODUCERS]
    name = min(producers, key=position.__getitem__) if producers else trace.names[root]
    sizes = [trace.sized[where] for where in parts if where in trace.sized]
    return Group(name, n_units, members, root=trace.names[root], blocks=lcm, part_sizes=sizes), counted


@dataclass
class Discovery:
    """What group discovery found: the groups, and what the FLOPs model and the preflight need beside them."""

    groups: list[Group]
    op_channels: dict[str, int]  # stateless leaf -> channels of its output
    aliases: dict[str, str]  # stateless leaf that passed its input on -> the leaf whose output it is
    rejected: list[tuple[str, str]]  # (group root, reason) of groups that cannot be modelled exactly
    functional: set[str]  # groups that reach a functional op fvcore counts


def discover_groups(model: nn.Module, example_inputs: torch.Tensor, ignored: list[str]) -> Discovery:
    """The prunable channel groups of `model` (the classifier and `ignored` layers left out), in model order."""
    with _grouping_bound(model):
        trace = trace_groups(model, example_inputs, ignored)
        position = {name: i for i, name in enumerate(trace.names.values())}
        groups, rejected, functional = [], [], set()
        for root, group in trace.groups:
            try:
                g, counted = _channel_group(model, trace, root, group)
            except _Irregular as e:
                rejected.append((trace.names[root], str(e)))
                continue
            except SpaceError:
                raise
            except Exception as e:  # inside Torch-Pruning, looking at the group root channel by root channel
                raise _grouping_failed(model, trace.names[root], e) from None
            groups.append(g)
            if counted:
                functional.add(g.name)
    groups.sort(key=lambda g: position.get(g.name, 0))  # model order, input to output
    return Discovery(groups, trace.channels, trace.aliases, rejected, functional)
