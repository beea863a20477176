"""Any CNN a user brings: exact FLOPs/params and a working pruned net, or a one-line refusal before anything runs.

One small architecture per structure found in torchvision and timm models (tests/archs.py): each supported one
is pruned by several strategies and checked against fvcore on the actually pruned network and against
Torch-Pruning's own surgery on the same channels; each unsupported one is refused, or its one bad group left out.
"""
import numpy as np
import pytest
import torch

from prunetune import PrunePlan, StrategySampler, preflight
from prunetune.search.cli import main
from prunetune.workers.groups import SpaceError
from prunetune.workers.space import count_flops
from tests import archs
from tests.reference import torch_pruning_surgery

SUPPORTED = {
    "grouped conv + squeeze-excitation": archs.GroupedSE,
    "BatchNorm subclass with children + functional pool": archs.BNActNet,
    "ghost module (concat of a conv and its depthwise copy)": archs.GhostNetLike,
    "layer scale + channels-last LayerNorm": archs.ConvNeXtLike,
    "class token + position embedding": archs.TokenNet,
}


def _verdict(model, target=0.5):
    return preflight(model, torch.zeros(1, 3, 32, 32), 10, 0.7,
                     lambda space: StrategySampler(space, target, 0.05, 0.7).sample(0))


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


def test_a_grouped_conv_keeps_whole_blocks():
    space = _verdict(archs.GroupedSE()).space
    grouped = {g.name: g for g in space.groups}
    assert grouped["grouped.0"].blocks == grouped["reduce.0"].blocks == 4
    for ratios in np.random.default_rng(2).uniform(0, 0.7, (5, len(space.groups))):
        kept = dict(zip([g.name for g in space.groups], space.kept_units(ratios)))
        assert kept["grouped.0"] % 4 == 0 and kept["reduce.0"] % 4 == 0


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


def test_a_window_partition_is_refused_in_one_line_naming_the_module():
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


@pytest.mark.parametrize("factory, fragment", [
    ("tests.archs:fixed_head", "model: the model returns 1000 outputs but the data has 10 classes"),
    ("tests.archs:mixnet_like", "model: 4 channel groups cannot be pruned exactly"),
])
def test_an_unsupported_model_is_refused_before_the_base_model_is_trained(tmp_path, capsys, factory, fragment):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main(["run", "--set", f"model.name={factory}", "--set", "data.name=synthetic", "--set", "data.num_classes=10",
                 "--set", f"output.dir={out}", "--set", f"output.cache_dir={cache}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"prunetune: error: {fragment}")
    assert len(err.splitlines()) == 1 and not out.exists() and not cache.exists()  # nothing trained, nothing written
