"""The other pruning methods: Network Slimming's sparsity training, unstructured pruning, stripe-wise pruning."""
from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from prunetune.search.artifacts import load_pruned, pruned_record, save_pruned
from prunetune.search.baselines import global_threshold
from prunetune.search.config import ConfigError, load_config, training_recipe
from prunetune.search.prepare import ensure_base, prepare, sparsity_trained, trained_base
from prunetune.search.sampler import StrategySampler
from prunetune.workers.constraints import CONSTRAINTS
from prunetune.workers.data import load_data
from prunetune.workers.finetune import FinetuneOptions, finetune
from prunetune.workers.models import build_model
from prunetune.workers.settings import FinetuneSettings
from prunetune.workers import sparsity as sparsity_module
from prunetune.workers.methods import stripe as stripe_module
from prunetune.workers.sparsity import add_l1_subgradient, batchnorms
from prunetune.workers.splits import splits_of
from prunetune.workers.space import count_flops
from prunetune.workers.prune import clone_module
from prunetune.workers.methods import METHODS
from prunetune.workers.methods.stripe import StripeConv2d, skeleton_train, stripe_norms, stripe_space
from prunetune.workers.methods.unstructured import direct_counts, remove_masks, unstructured_space, weight_importance
from tests.runs import small


def _gammas(model) -> np.ndarray:
    return torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]).numpy()


def test_the_l1_penalty_drives_batchnorm_scales_down():
    data = load_data("digits")
    cfg = replace(training_recipe(load_config(None, ["finetune.batch_size=128"])), epochs=2)
    plain, slim = (build_model("digits_cnn", 10, 1) for _ in range(2))
    slim.load_state_dict(plain.state_dict())
    finetune(plain, data, cfg)
    finetune(slim, data, cfg, FinetuneOptions(after_backward=lambda: add_l1_subgradient(
        [m.weight for m in batchnorms(slim)], 3e-2)))
    assert np.median(_gammas(slim)) < np.median(_gammas(plain)) - 0.05
    assert _gammas(slim).max() < _gammas(plain).min()  # every scale pulled towards zero


class _Stop(Exception):
    pass


@pytest.mark.parametrize("granularity, criterion", [("channel", "bn_scale"), ("stripe", "l1")])
def test_sparsity_training_never_sees_the_held_out_or_validation_split(tmp_path, monkeypatch, granularity, criterion):
    cfg = load_config(None, small(tmp_path / "run", tmp_path / "cache", "model.sparsity=5e-3",
                                  "model.sparsity_epochs=1", f"search.granularity={granularity}",
                                  f"search.criterion={criterion}"))
    checked = prepare(cfg)
    base = tmp_path / "base.pt"
    torch.save(checked.model.state_dict(), base)
    seen = {}

    def record(model, data, recipe, options):  # instead of the training itself
        seen.update(vars(options))
        os.makedirs(os.path.dirname(options.checkpoint_path), exist_ok=True)
        open(options.checkpoint_path, "w").close()

    monkeypatch.setattr(sparsity_module, "finetune", record)
    monkeypatch.setattr(stripe_module, "finetune", record)
    sparsity_trained(checked, str(base))
    splits = splits_of(len(checked.data.train), cfg.evaluation.settings())
    assert seen["stage"] == "sparsity training" and sorted(seen["train_indices"]) == sorted(splits.rest)
    assert not set(seen["train_indices"]) & (set(splits.heldout) | set(splits.validation))


def test_sparsity_training_runs_after_the_base_is_cached_and_resumes(tmp_path, capsys):
    cfg = load_config(None, small(tmp_path / "run", tmp_path / "cache", "model.sparsity=5e-3",
                                  "model.sparsity_epochs=2", "search.criterion=bn_scale"))
    prep = ensure_base(prepare(cfg))
    first = prep.sparsity
    assert first["gamma_after"]["median"] < first["gamma_before"]["median"]
    assert prep.base_checkpoint == first["checkpoint"] and first["checkpoint"].startswith(str(tmp_path / "cache"))
    trained = {k: v.clone() for k, v in prep.model.state_dict().items()}
    os.remove(first["checkpoint"])  # as if interrupted after its first epoch:
    interrupted = prepare(cfg)
    trained_base(cfg, interrupted.model, interrupted.data)

    def stop(epoch, metrics, path):
        raise _Stop

    with pytest.raises(_Stop):
        scales = [m.weight for m in batchnorms(interrupted.model)]
        finetune(interrupted.model, interrupted.data, replace(training_recipe(cfg), epochs=2), FinetuneOptions(
            train_indices=splits_of(len(interrupted.data.train), cfg.evaluation.settings()).rest,
            checkpoint_path=first["checkpoint"] + ".resume", on_epoch=stop,
            after_backward=lambda: add_l1_subgradient(scales, 5e-3)))
    capsys.readouterr()
    prep = ensure_base(prepare(cfg))
    assert "sparsity training: resumed after epoch 1 of 2" in capsys.readouterr().err
    assert all(torch.equal(trained[k], v) for k, v in prep.model.state_dict().items())
    assert not os.path.exists(first["checkpoint"] + ".resume")
    prep = ensure_base(prepare(cfg))
    assert "sparsity training: loaded" in capsys.readouterr().err


@pytest.mark.parametrize("setting, key", [("model.sparsity=1e-4", "model.sparsity"),
                                          ("search.criterion=bn_scale", "search.criterion")])
def test_batchnorm_methods_on_a_model_without_batchnorm_are_refused_in_one_line(tmp_path, setting, key):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"output.cache_dir={tmp_path / 'cache'}",
                             "model.name=tests.archs:no_batchnorm", setting])
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    assert str(e.value) == (f"{key}: tests.archs:no_batchnorm has no BatchNorm layer with a scale (gamma); Network "
                            "Slimming and bn_scale need one (use search.criterion: l1)")


# Unstructured pruning (torch.nn.utils.prune masks)

@pytest.fixture(scope="module")
def unstructured():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    example = torch.zeros(1, 3, 32, 32)
    return model, unstructured_space(model, example), example


def test_unstructured_flops_and_params_equal_a_direct_count_on_the_masked_network(unstructured):
    model, space, example = unstructured
    plan = METHODS["unstructured"].plan(model, space)
    rng = np.random.default_rng(0)
    for ratios in [np.zeros(len(space.groups)), np.full(len(space.groups), 0.9)] + \
            [rng.uniform(0, 0.9, len(space.groups)) for _ in range(3)]:
        pruned = plan.apply(ratios)
        flops, params = direct_counts(pruned, example)
        assert params == space.params(ratios)
        assert abs(flops - space.flops(ratios)) <= 1
        nonzero = sum(int((m.weight != 0).sum()) for m in pruned.modules() if hasattr(m, "weight_mask"))
        assert nonzero == sum(space.kept_units(ratios))
    assert space.flops(np.zeros(len(space.groups))) == space.base_flops


def test_unstructured_candidates_meet_a_non_zero_params_budget_and_keep_the_largest_weights(unstructured):
    model, space, _ = unstructured
    sampler = StrategySampler(space, 0.3, 0.01, 0.9, constraint=CONSTRAINTS["params"])
    plan = METHODS["unstructured"].plan(model, space)
    for i in range(5):
        ratios = sampler.sample(i)
        assert abs(space.params(ratios) / space.base_params - 0.3) <= 0.01
        pruned = plan.apply(ratios)
        for g in space.groups:
            w, kept = model.get_submodule(g.name).weight.abs(), pruned.get_submodule(g.name).weight != 0
            if kept.any() and (~kept).any():
                assert w[kept].min() >= w[~kept].max()  # magnitude: every kept weight outweighs every pruned one


def test_masks_survive_fine_tuning_saving_and_export(unstructured, tmp_path):
    model, space, example = unstructured
    ratios = np.full(len(space.groups), 0.6)
    pruned = METHODS["unstructured"].plan(model, space).apply(ratios)
    zeros = {g.name: pruned.get_submodule(g.name).weight == 0 for g in space.groups}
    data = load_data("synthetic", image_size=32, num_classes=10, train_size=64, test_size=16)
    finetune(pruned, data, FinetuneSettings(epochs=1, batch_size=32))
    assert all(bool((pruned.get_submodule(n).weight[z] == 0).all()) for n, z in zeros.items())
    record = pruned_record({"name": "resnet20", "num_classes": 10, "in_channels": 3, "kwargs": {}}, space, ratios,
                           "l1", "unstructured", "", None)
    path = str(tmp_path / "rank1.pt")
    save_pruned(path, pruned, record)
    loaded, _, _ = load_pruned(path)
    x = torch.randn(4, 3, 32, 32)
    pruned.eval()
    assert torch.allclose(loaded(x), pruned(x), atol=1e-6)
    dense = io.BytesIO()
    torch.save(pruned.state_dict(), dense)
    assert os.path.getsize(path) < 0.5 * dense.tell()  # bit mask + non-zero values, not orig + mask
    remove_masks(loaded)
    assert not any("mask" in k for k in loaded.state_dict()) and torch.allclose(loaded(x), pruned(x), atol=1e-6)


def test_the_global_magnitude_baseline_keeps_every_weight_above_one_threshold(unstructured):
    model, space, _ = unstructured
    sampler = StrategySampler(space, 0.5, 0.02, 0.9, constraint=CONSTRAINTS["params"])
    importance = weight_importance(model, space)
    ratios = global_threshold(sampler, importance, comparable=True)
    assert sampler.contains(ratios)
    kept, pruned = [], []
    for imp, k in zip(importance, space.kept_units(ratios)):
        order = np.sort(imp)[::-1]
        if len(imp) - k < int(len(imp) * 0.9):
            kept.append(order[k - 1])
            pruned.append(order[k] if k < len(imp) else -np.inf)
    assert min(kept) >= max(pruned)  # torch's global_unstructured: one magnitude threshold across layers


@pytest.mark.parametrize("setting, message", [
    ("search.criterion=bn_scale", "search.criterion: bn_scale ranks channels by BatchNorm scales; unstructured "
                                  "pruning ranks single weights: use l1 (magnitude), l2 or random"),
    ("search.constraint=latency", "search.constraint: latency budgets need channel pruning: the latency table times "
                                  "dense layers by their channel counts, and unstructured pruning keeps single weights "
                                  "(use flops or params)"),
    ("search.round_to=8", "search.round_to: rounds channel counts; unstructured pruning keeps single weights (leave "
                          "it at 1)"),
    ("model.sparsity=1e-4", "model.sparsity: Network Slimming prunes channels; use it with search.granularity: "
                            "channel")])
def test_settings_that_make_no_sense_with_unstructured_pruning_are_one_line_errors(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["search.granularity=unstructured", setting])
    assert str(e.value) == message


# Stripe-wise pruning (SP)

def masked_dense(conv: torch.nn.Conv2d, kept: torch.Tensor) -> torch.nn.Conv2d:
    """The dense conv with every stripe not in `kept` zeroed (what a StripeConv2d must equal)."""
    dense = clone_module(conv, {})
    mask = torch.zeros(conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3])
    mask[torch.as_tensor(kept)] = 1
    kh, kw = conv.kernel_size
    with torch.no_grad():
        dense.weight.mul_(mask.view(conv.out_channels, kh, kw)[:, None].to(conv.weight))
    return dense


@pytest.mark.parametrize("conv", [
    torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
    torch.nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), torch.nn.Conv2d(4, 6, 5)])
def test_a_stripe_layer_equals_the_dense_conv_with_its_pruned_stripes_zeroed(conv):
    torch.manual_seed(0)
    stripes = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    kept = torch.randperm(stripes)[: stripes // 3]
    x = torch.randn(2, conv.in_channels, 11, 13)
    layer = StripeConv2d(conv, kept)
    assert torch.allclose(layer(x), masked_dense(conv, kept)(x), atol=1e-5)
    assert layer.weight.shape == (len(kept), conv.in_channels)  # only the kept stripes are stored
    ho, wo = masked_dense(conv, kept)(x).shape[2:]
    assert count_flops(layer, x[:1]).total() == len(kept) * conv.in_channels * ho * wo  # kept stripes' FLOPs


def test_a_stripe_layer_runs_the_stripes_of_a_loaded_state_not_those_it_ran_before():
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 7, 7)
    first, second = torch.randperm(54)[:20], torch.randperm(54)[:20]
    layer = StripeConv2d(conv, first)
    assert torch.allclose(layer(x), masked_dense(conv, first)(x), atol=1e-5)  # its positions are read now
    layer.load_state_dict(StripeConv2d(conv, second).state_dict())  # same shapes, other stripes
    assert torch.allclose(layer(x), masked_dense(conv, second)(x), atol=1e-5)


def test_stripe_flops_and_params_equal_fvcore_and_a_parameter_count_on_the_pruned_network():
    torch.manual_seed(0)
    model, example = build_model("resnet20", 10, 3).eval(), torch.zeros(1, 3, 32, 32)
    space = stripe_space(model, example)
    plan = METHODS["stripe"].plan(model, space)
    rng = np.random.default_rng(0)
    for ratios in [np.full(len(space.groups), 0.9)] + [rng.uniform(0, 0.9, len(space.groups)) for _ in range(3)]:
        pruned = plan.apply(ratios)
        assert count_flops(pruned, example).total() == space.flops(ratios)
        assert sum(p.numel() for p in pruned.parameters()) == space.params(ratios)
        kept = plan.kept(ratios)[0]
        norms = model.get_submodule(space.groups[0].name).weight.abs().sum(1).flatten()
        dropped = torch.ones(len(norms), dtype=torch.bool)
        dropped[kept] = False
        if dropped.any():
            assert norms[kept].min() >= norms[dropped].max()  # the strongest stripes are kept


def test_filter_skeleton_training_shrinks_stripes_and_leaves_plain_convs():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    before = stripe_norms(model)
    cfg = replace(training_recipe(load_config(None, ["finetune.batch_size=128"])), epochs=2)
    skeleton_train(model, load_data("digits"), cfg, 5e-2)
    after = stripe_norms(model)
    assert np.median(after) < 0.9 * np.median(before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_a_stripe_model_file_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    space = stripe_space(model, torch.zeros(1, 3, 32, 32))
    ratios = np.full(len(space.groups), 0.5)
    pruned = METHODS["stripe"].plan(model, space).apply(ratios).eval()
    record = pruned_record({"name": "resnet20", "num_classes": 10, "in_channels": 3, "kwargs": {}}, space, ratios,
                           "l1", "stripe", "", None)
    save_pruned(str(tmp_path / "m.pt"), pruned, record)
    loaded, _, _ = load_pruned(str(tmp_path / "m.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), pruned(x), atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ("search.criterion=bn_scale", "search.criterion: bn_scale ranks channels by BatchNorm scales; stripe-wise "
                                  "pruning ranks stripes: use l1 (magnitude), l2 or random"),
    ("search.round_to=8", "search.round_to: rounds channel counts; stripe-wise pruning keeps stripes (leave it at 1)")])
def test_settings_that_make_no_sense_with_stripes_are_one_line_errors(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["search.granularity=stripe", setting])
    assert str(e.value) == message
