"""Any CNN a user brings: exact FLOPs/params and a working pruned net, or a one-line refusal before anything runs.

One small architecture per structure found in torchvision and timm models (tests/archs.py): each supported one
is pruned by several strategies and checked against fvcore on the actually pruned network and against
Torch-Pruning's own surgery on the same channels; each unsupported one is refused, or its one bad group left out.
"""
import copy
import dataclasses
import re
import time

import numpy as np
import pytest
import torch

from prunetune import PreflightOptions, PrunePlan, PruningSpace, StrategySampler, preflight
from prunetune.search.cli import main
from prunetune.workers.groups import SpaceError
from prunetune.workers.preflight import FUNCTIONAL_TOLERANCE, functional_gap
from prunetune.workers.space import count_flops
from prunetune.workers.tasks import CLASSIFICATION, output_tensors
from tests import archs
from tests.bad_values import BAD_MODELS
from tests.reference import torch_pruning_surgery
from tests.runs import as_args

SUPPORTED = {
    "grouped conv + squeeze-excitation": archs.GroupedSE,
    "BatchNorm subclass with children + functional pool": archs.BNActNet,
    "ghost module (concat of a conv and its depthwise copy)": archs.GhostNetLike,
    "layer scale + channels-last LayerNorm": archs.ConvNeXtLike,
    "class token + position embedding": archs.TokenNet,
    "transposed conv (YOLOv8-seg's mask prototypes)": archs.ProtoNet,
}


def _verdict(model, target=0.5, **kwargs):
    return preflight(model, torch.zeros(1, 3, 32, 32),
                     PreflightOptions(10, 0.7, lambda space: StrategySampler(space, target, 0.05, 0.7).sample(0),
                                      **kwargs))


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_flops_params_and_forward_are_exact_on_the_pruned_network(name):
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(SUPPORTED[name]()).eval()
    space = _verdict(model).space
    plan = PrunePlan(model, space, "l1")
    x = torch.randn(2, 3, 32, 32)
    for ratios in np.random.default_rng(1).uniform(0, 0.7, (3, len(space.groups))):
        pruned = plan.apply(ratios).eval()
        assert space.flops(ratios) == count_flops(pruned, x[:1]).total() < space.base_flops
        assert space.params(ratios) == sum(p.numel() for p in pruned.parameters())
        reference = torch_pruning_surgery(model, space, plan, ratios)
        with torch.no_grad():
            assert pruned(x).shape == (2, 10)
            assert torch.allclose(pruned(x), reference(x), atol=1e-5)  # the same channels removed the same way


def test_the_preflight_names_its_steps_once_lines_are_due(monkeypatch, capsys):
    from prunetune.workers import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1e9)
    _verdict(archs.GroupedSE())
    assert "preflight:" not in capsys.readouterr().err
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    _verdict(archs.GroupedSE())
    said = [re.sub(r" \(\d+:\d\d so far\)$| in \d+:\d\d$", "", line)  # times: however busy the machine
            for line in capsys.readouterr().err.splitlines() if line.startswith("preflight:")]
    assert said == ["preflight: tracing the channel groups"] + [
        f"preflight: proving the {name} strategy (counts and function)"
        for name in ("most pruned", "first sampled", "least pruned")] + ["preflight: done"]


def test_a_grouped_conv_keeps_whole_blocks():
    space = _verdict(archs.GroupedSE()).space
    grouped = {g.name: g for g in space.groups}
    assert grouped["grouped.0"].blocks == grouped["reduce.0"].blocks == 4
    for ratios in np.random.default_rng(2).uniform(0, 0.7, (5, len(space.groups))):
        kept = dict(zip([g.name for g in space.groups], space.kept_units(ratios)))
        assert kept["grouped.0"] % 4 == 0 and kept["reduce.0"] % 4 == 0


def test_a_transposed_conv_is_pruned_on_both_sides_and_ranked_by_its_own_filters():
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(archs.ProtoNet()).eval()
    verdict = _verdict(model)
    assert verdict.left_out == []
    roles = {m.role: g.name for g in verdict.space.groups for m in g.members if m.module == "upsample"}
    assert roles == {"in": "cv1.conv", "out": "upsample"}  # its filters ([in, out, k, k]: axis 1) name its group
    plan = PrunePlan(model, verdict.space, "l1")
    group = [g.name for g in verdict.space.groups].index("upsample")
    l1 = model.upsample.weight.detach().abs().sum((0, 2, 3)).numpy()
    assert list(plan.order[group]) == list(np.argsort(l1, kind="stable"))


def test_a_ghost_module_prunes_a_channel_and_its_depthwise_copy_together():
    space = _verdict(archs.GhostNetLike()).space
    group = next(g for g in space.groups if any(m.module == "ghost2.cheap.0" for m in g.members))
    per_unit = {m.module: m.per_unit for m in group.members if m.role == "out"}
    assert per_unit["stem.0"] == 2 and per_unit["ghost2.primary.0"] == 1  # the stream keeps channel j with j + 8


def test_a_channel_shuffle_group_is_left_out_with_its_module_named():
    verdict = _verdict(archs.ShuffleNetLike())
    assert verdict.left_out == [("shuffle_block.a", "shuffle_block (ShuffleUnit) reshapes the channels into groups "
                                                    "(a channel shuffle)")]
    assert "shuffle_block.a" not in [g.name for g in verdict.space.groups]


@pytest.mark.parametrize("trace_fails", [False, True])
def test_a_window_partition_is_refused_in_one_line_naming_the_module(monkeypatch, trace_fails):
    import torch_pruning as tp

    build = tp.DependencyGraph.build_dependency

    def failing(self, *args, **kwargs):  # as on torchvision's swin_s and swin_b, after the forward pass it traces
        build(self, *args, **kwargs)
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    if trace_fails:
        monkeypatch.setattr(tp.DependencyGraph, "build_dependency", failing)
    with pytest.raises(SpaceError) as e:
        _verdict(archs.WindowNet())
    assert str(e.value) == ("model: attend (WindowMix) reshapes feature maps into windows or pixel blocks (as Swin, "
                            "MaxViT, pixel unshuffle do), which channel pruning cannot follow")


def test_fixed_size_splits_in_two_layers_are_refused_in_one_line():
    with pytest.raises(SpaceError) as e:
        _verdict(archs.MixNetLike(mixes=2))
    message = str(e.value)
    assert "\n" not in message and "features.3 (MixConv) splits the channels into parts of fixed size" in message
    assert "model.ignored_layers=[" in message and "features.9 (MixConv)" in message


def test_a_fixed_size_split_in_one_layer_is_left_out_with_a_warning():
    verdict = _verdict(archs.MixNetLike(mixes=1), target=0.7)
    assert {reason for _, reason in verdict.left_out} == {"features.3 (MixConv) splits the channels into parts of "
                                                          "fixed size"}
    assert [g.name for g in verdict.space.groups] == ["features.6"]


def test_a_factory_gets_the_data_class_count_or_is_refused(tmp_path, capsys):
    from prunetune import build_model

    assert build_model("tests.archs:thousand_way", 3).fc.out_features == 3
    with pytest.raises(SpaceError, match="model: the model returns 1000 outputs but the data has 10 classes"):
        _verdict(build_model("tests.archs:fixed_head", 10))


@pytest.mark.parametrize("what, overrides, fragment", BAD_MODELS)
def test_an_unsupported_model_is_refused_before_the_base_model_is_trained(tmp_path, capsys, what, overrides, fragment):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main(["run", *as_args([*overrides, f"output.dir={out}", f"output.cache_dir={cache}"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"prunetune: error: {fragment}")
    assert len(err.splitlines()) == 1 and not out.exists() and not cache.exists()  # nothing trained, nothing written


# Issue 28: every pattern either exact in function and counts on 20 sampled strategies, or refused in one line.

def _sampled(space, count=20, target=0.5):
    sampler = StrategySampler(space, target, 0.05, 0.7)
    return [sampler.sample(i) for i in range(count)]


def _zeroed_reference(model, plan, ratios):
    """The base with every removed channel's filter, bias and norm parameters zeroed, so it is 0 wherever it flows
    (the issue's check; exact for nets without cross-channel normalisation)."""
    reference = copy.deepcopy(model).eval()
    for (name, role), kept in plan.keep_indices(ratios).items():
        if role != "out" or plan.dims[(name, role)].layer is None:
            continue
        removed = torch.from_numpy(np.setdiff1d(np.arange(plan.dims[(name, role)].size), kept))
        module = reference.get_submodule(name)
        for attr, axis in plan.dims[(name, role)].layer.tensors(module, role):
            if attr in ("weight", "bias"):
                getattr(module, attr).data.index_fill_(axis, removed, 0.0)
    return reference


def _assert_exact_on_sampled_strategies(model, space, function=True, target=0.5):
    """On 20 sampled strategies: the pruned network runs, its FLOPs and params are fvcore's, and (for nets without
    cross-channel statistics) it computes what the base computes with the removed channels zeroed."""
    plan = PrunePlan(model, space, "l1")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for ratios in _sampled(space, target=target):
        pruned = plan.apply(ratios).eval()
        assert space.flops(ratios) == count_flops(pruned, x[:1]).total() < space.base_flops
        assert space.params(ratios) == sum(p.numel() for p in pruned.parameters())
        with torch.no_grad():
            got = output_tensors(pruned(x))
            if function:
                for g, want in zip(got, output_tensors(_zeroed_reference(model, plan, ratios)(x)), strict=True):
                    assert torch.allclose(g, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("permutation", list(archs.PERMUTATIONS))
def test_a_channel_permutation_between_convs_is_caught_and_its_group_left_out(permutation):
    torch.manual_seed(0)
    model = archs.Permuted(permutation).eval()
    if permutation != "ChannelShuffle":  # (found by its op already, in discovery)
        # what Torch-Pruning's grouping alone gives: c1's pruned filters go from the wrong input columns of c2
        space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32), ignored_layers=["c0", "c2"])
        plan = PrunePlan(model, space, "l1")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            got, want = plan.apply([0.5])(x), _zeroed_reference(model, plan, [0.5])(x)
        assert not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    verdict = _verdict(model)
    assert [name for name, _ in verdict.left_out] == ["c1"]
    assert [g.name for g in verdict.space.groups] == ["c0", "c2"]
    _assert_exact_on_sampled_strategies(model, verdict.space)
    assert "computes what the base computes without the removed channels" in verdict.describe()


def test_a_channel_shuffle_module_is_named_as_the_cause():
    verdict = _verdict(archs.Permuted("ChannelShuffle"))
    assert verdict.left_out == [("c1", "permute (ChannelShuffle) shuffles the channels (a channel shuffle)")]


def test_a_pixel_shuffle_is_named_as_the_cause():
    verdict = _verdict(archs.PixelShuffleNet())
    assert verdict.left_out == [("c1", "shuffle (PixelShuffle) moves channels into pixels (a PixelShuffle)")]
    _assert_exact_on_sampled_strategies(archs.PixelShuffleNet().eval(), verdict.space, function=False)


def test_a_functional_group_norm_keeps_multiples_of_its_group_count():
    torch.manual_seed(0)
    model = archs.FunctionalGroupNorm().eval()
    verdict = _verdict(model)
    assert verdict.left_out == [] and [(g.name, g.blocks) for g in verdict.space.groups] == [("c0", 8), ("c1", 1)]
    for ratios in _sampled(verdict.space):
        assert verdict.space.kept_units(ratios)[0] % 8 == 0
    # statistics over fewer channels differ from the base's, so function is the preflight's (norm reduced to affine)
    _assert_exact_on_sampled_strategies(model, verdict.space, function=False)
    plan = PrunePlan(model, verdict.space, "l1")
    for ratios in _sampled(verdict.space):
        assert functional_gap(plan, ratios, plan.apply(ratios), torch.randn(1, 3, 32, 32)) <= FUNCTIONAL_TOLERANCE


@pytest.mark.parametrize("norm, act", [("batch", "prelu"), ("instance", "prelu"), ("instance", "relu")])
def test_shared_prelu_and_affine_instance_norm_are_pruned_exactly(norm, act):
    torch.manual_seed(0)
    model = archs.NormActNet(norm, act).eval()
    verdict = _verdict(model)
    assert verdict.left_out == [] and [g.name for g in verdict.space.groups] == ["c0", "c1"]
    members = {m.module: m.kind for g in verdict.space.groups for m in g.members}
    assert members["n0"] == members["n1"] == "batchnorm"  # sliced like BatchNorm's (weight, bias)
    _assert_exact_on_sampled_strategies(model, verdict.space)


def test_a_torch_compiled_submodule_is_refused_in_one_line():
    with pytest.raises(SpaceError) as e:
        _verdict(archs.CompiledBlock())
    assert str(e.value) == ("model: block (OptimizedModule) is wrapped in torch.compile, which Torch-Pruning and "
                            "fvcore cannot trace; build the model without torch.compile (compile the pruned model "
                            "instead)")


def test_a_layer_fvcore_cannot_trace_is_named_in_one_line():
    with pytest.raises(SpaceError) as e:
        _verdict(archs.NormActNet("batch", "relu", head=archs.UntraceableHead()))
    assert str(e.value) == ("model: fvcore cannot count the FLOPs of NormActNet: its trace fails in pool "
                            "(UntraceableHead) (RuntimeError: this layer cannot be traced)")


def test_an_error_inside_torch_prunings_grouping_is_one_line_naming_the_layer(monkeypatch):
    import torch_pruning as tp

    model = archs.Permuted("roll")
    find_group = tp.DependencyGraph.get_pruning_group

    def failing(self, module, *args, **kwargs):  # as bat_resnext26ts's IndexError, lambda_resnet26t's ZeroDivision
        if module is model.c1:
            raise ZeroDivisionError("integer division or modulo by zero")
        return find_group(self, module, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failing)
    with pytest.raises(SpaceError) as e:
        _verdict(model)
    assert str(e.value) == ("model: grouping the channels of Permuted fails at c1 (Conv2d) (ZeroDivisionError: "
                            "integer division or modulo by zero); prunetune cannot prune it")


@pytest.mark.parametrize("bound, fragment", [("GROUPING_MEMORY_LIMIT", "grew the process by 1.0 GiB"),
                                             ("GROUPING_CPU_LIMIT_S", "did not finish within 0 s of CPU time")])
def test_grouping_is_bounded_in_memory_and_cpu_time(monkeypatch, bound, fragment):
    from prunetune.workers import groups

    monkeypatch.setattr(groups, bound, 0)
    # the process's memory as the bound reads it: 1 GiB more after its start (the real figure moves with whatever
    # else the process frees meanwhile, e.g. earlier tests' memory in a pytest-xdist worker)
    readings = iter([2 ** 30])
    monkeypatch.setattr(groups, "_resident_bytes", lambda: next(readings, 2 ** 31))
    with pytest.raises(SpaceError) as e:
        with groups._grouping_bound(archs.Permuted()):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # CPU work until the bound (checked every 0.1 s of CPU) refuses it
                sum(range(10000))
    message = str(e.value)
    assert message.startswith("model: Torch-Pruning's grouping of the channels of Permuted ") and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("module, function, message", [
    ("groups", "_members", "model: grouping the channels of Permuted fails at c2 (Conv2d) (KeyError: 'c1.weight'); "
                           "prunetune cannot prune it"),  # one layer's grouping: the layer is named
    ("space", "_build", "model: building the pruning space of Permuted fails (KeyError: 'c1.weight'); prunetune "
                        "cannot prune it"),  # any other error: the model is named
], ids=["grouping a layer", "building the space"])
def test_an_error_while_building_the_space_is_one_line_naming_where(monkeypatch, module, function, message):
    import importlib

    def broken(*args):
        raise KeyError("c1.weight")

    monkeypatch.setattr(importlib.import_module(f"prunetune.workers.{module}"), function, broken)
    with pytest.raises(SpaceError) as e:
        _verdict(archs.Permuted("roll"))
    assert str(e.value) == message


@pytest.mark.parametrize("granularity", ["unstructured", "stripe"])
def test_a_torch_compiled_submodule_is_refused_by_every_method(granularity):
    from prunetune.workers.methods import METHODS

    with pytest.raises(SpaceError, match=r"^model: block \(OptimizedModule\) is wrapped in torch.compile"):
        METHODS[granularity].preflight(archs.CompiledBlock(), torch.zeros(1, 3, 32, 32), PreflightOptions(
            10, 0.7, lambda space: StrategySampler(space, 0.5, 0.05, 0.7).sample(0)))


def test_inspect_warns_of_a_permuted_group_and_says_what_the_preflight_proved(capsys):
    code = main(["inspect", "--model", "tests.archs:rolled", "--input-shape", "3,32,32", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "preflight: warning: left the group of c1 out (the pruned network computes something other than the base " \
           "without the removed channels" in out
    assert out.count("and computes what the base computes without the removed channels") == 3  # the 3 strategies


# Issue 35: YOLO's blocks, whose conv output is chunked into equal halves consumed differently (C2f, C3k2).

RAW_OUTPUTS = dataclasses.replace(CLASSIFICATION, check=lambda prediction, num_classes: None)  # a detector's maps
YOLO_BLOCKS = {  # name -> (block, whether it chunks its cv1's output in two)
    "C2f with shortcuts": (lambda: archs.C2f(16, 16, 2, shortcut=True), True),
    "C2f without shortcuts": (lambda: archs.C2f(16, 16, 1), True),
    "C2f split by the size it holds": (lambda: archs.C2f(16, 16, 1, split=True), True),
    "C3k2 of bottlenecks": (lambda: archs.C3k2(16, 16, 1, c3k=False, e=0.25), True),
    "C3k2 of C3k blocks": (lambda: archs.C3k2(16, 16, 1, c3k=True), True),
    "C3": (lambda: archs.C3(16, 16, 2), False),
    "SPPF": (lambda: archs.SPPF(16, 16), False),
}


@pytest.mark.parametrize("block", list(YOLO_BLOCKS))
def test_a_yolo_block_is_pruned_exactly_with_no_group_left_out(block):
    torch.manual_seed(0)
    make, chunks = YOLO_BLOCKS[block]
    model = archs.randomize_batchnorm(archs.BlockNet(make())).eval()
    verdict = _verdict(model)
    space = verdict.space
    assert verdict.left_out == [] and space.rejected == []
    halves = [i for i, g in enumerate(space.groups) if g.blocks == 2]
    assert [space.groups[i].name for i in halves] == (["blocks.0.cv1.conv"] if chunks else [])
    for ratios in _sampled(space):  # each half keeps as many channels, so the pruned chunk splits where they meet
        assert all(space.kept_units(ratios)[i] % 2 == 0 for i in halves)
    _assert_exact_on_sampled_strategies(model, space)


def test_a_yolo_like_detector_is_pruned_exactly_with_its_chunks_in_two_blocks():
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(archs.YoloLike()).eval()
    verdict = _verdict(model, task=RAW_OUTPUTS)
    space = verdict.space
    assert verdict.left_out == [] and space.rejected == []
    chunked = {"stem.2", "p3.1", "p5.1", "top_down4", "top_down3", "bottom_up4", "bottom_up5"}  # every C2f, C3k2
    assert {g.name for g in space.groups if g.blocks == 2} == {f"{name}.cv1.conv" for name in chunked}
    heads = {f"detect.{branch}.{i}.2" for branch in ("cv2", "cv3") for i in range(3)} | {"detect.dfl.conv"}
    assert set(space.ignored_layers) == heads  # their outputs are never pruned (their inputs are)
    assert not heads & {m.module for g in space.groups for m in g.members if m.role == "out"}
    _assert_exact_on_sampled_strategies(model, space)


def test_an_equal_split_by_a_held_size_gets_the_pruned_size():
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(archs.BlockNet(archs.C2f(16, 16, 1, split=True))).eval()
    space = _verdict(model).space
    assert [g.part_sizes for g in space.groups if g.blocks == 2] == [[("blocks.0", "c")]]
    plan = PrunePlan(model, space, "l1")
    for ratios in _sampled(space):  # split((c, c)) of the pruned cv1 output: c is its half
        block = plan.apply(ratios).blocks[0]
        assert 2 * block.c == block.cv1.conv.out_channels and model.blocks[0].c == 8


@pytest.mark.parametrize("heads", [1, 2])
def test_an_attention_blocks_groups_are_left_out_before_torch_prunings_grouping_grows(monkeypatch, heads):
    import torch_pruning.dependency.index_mapping as mapping

    from prunetune.workers import groups

    mapped = []  # indices Torch-Pruning maps through a reshape (each channel to the H * W pixels of the map)
    flatten = mapping._FlattenIndexMapping.__call__
    monkeypatch.setattr(mapping._FlattenIndexMapping, "__call__", lambda self, idxs: mapped.append(
        len(out := flatten(self, idxs))) or out)
    monkeypatch.setattr(groups, "GROUPING_MEMORY_LIMIT", 2 ** 28)  # a regression is refused in seconds, not 4 GiB
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(archs.BlockNet(archs.C2PSA(16, heads), archs.C2f(16, 16, 1, split=True))).eval()
    verdict = _verdict(model, target=0.8)
    reason = "blocks.0.attn (Attention) reshapes the channels into and out of attention heads"
    assert sorted(verdict.left_out) == [(f"blocks.0.{name}.conv", reason) for name in ("attn.pe", "attn.qkv", "cv1")]
    assert {"blocks.0.cv2.conv", "blocks.0.ffn.0.conv", "blocks.1.cv1.conv"} <= {g.name for g in verdict.space.groups}
    assert sum(mapped) < 1000  # 38 million (4 GiB, 95 s of CPU) when its groups went through the attention
    _assert_exact_on_sampled_strategies(model, verdict.space, target=0.8)


@pytest.mark.parametrize("how", list(archs.FixedSplit.SPLITS))
def test_splits_of_fixed_or_unequal_size_are_refused_in_one_line(how):
    with pytest.raises(SpaceError) as e:
        _verdict(archs.BlockNet(archs.FixedSplit(16, how), archs.FixedSplit(16, how)))
    message = str(e.value)
    assert "\n" not in message and message.startswith("model: 2 channel groups cannot be pruned exactly")
    assert "blocks.0 (FixedSplit) splits the channels into parts of fixed size" in message


def test_an_equal_chunk_that_splits_where_two_groups_meet_is_left_out_with_a_warning():
    torch.manual_seed(0)
    model = archs.randomize_batchnorm(archs.BlockNet(archs.ChunkedConcat(16))).eval()
    verdict = _verdict(model)
    reason = ("blocks.0 (ChunkedConcat) chunks the channels into 2 equal parts, which the group's channels do not "
              "fill alike")
    assert sorted(verdict.left_out) == [("blocks.0.a.conv", reason), ("blocks.0.b.conv", reason)]
    assert "blocks.0.m.conv" in [g.name for g in verdict.space.groups]
    _assert_exact_on_sampled_strategies(model, verdict.space)
