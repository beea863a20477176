"""The baselines without Ray: the one-shot global rules and the iterative one are Torch-Pruning's, each lands in
the band under its own name, a rule the method or model cannot compute is left out, and a run keeps the baselines
it started with."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from prunetune import PruningSpace, StrategySampler, build_model, load_config
from prunetune.search.baselines import (BASELINES, LEGACY, Ranking, baselines, global_threshold, kept_ratios,
                                        run_baselines)
from prunetune.search.config_file import ConfigError
from prunetune.search.prepare import prepare
from prunetune.search.rankings import iterative_kept, rankings
from prunetune.workers.criteria import GROUP_KINDS, TAYLOR_KINDS, group_importance, loss_gradients
from tests.archs import randomize_batchnorm
from tests.runs import small


@pytest.fixture(scope="module")
def resnet():
    model = randomize_batchnorm(build_model("resnet20", 10)).eval()
    return model, PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("rule", ["magnitude", "taylor"])
def test_a_global_rule_keeps_what_torch_pruning_global_pruning_keeps(resnet, rule):
    """Torch-Pruning's MetaPruner(global_pruning=True) with GroupMagnitudeImportance(p=1) (or GroupTaylorImportance
    on the same gradients), default normaliser "mean", pruning 40% of the channels in one step; the baseline at the
    FLOPs that leaves (band +-0.2%) keeps exactly as many channels in every group. One step: Torch-Pruning's
    iterative pruning to a FLOPs target re-normalises the importance over the channels left at each step, which no
    single threshold reproduces."""
    model, space = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradients = loss_gradients(model, _batches(), lambda out: out, F.cross_entropy) if rule == "taylor" else None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training  # the model left as it was
    reference = copy.deepcopy(model)
    for name, p in reference.named_parameters():
        p.grad = None if gradients is None else gradients[name].clone()
    importance = tp.importance.GroupTaylorImportance() if gradients else tp.importance.GroupMagnitudeImportance(p=1)
    tp.pruner.MetaPruner(reference, torch.zeros(1, 3, 32, 32), importance=importance, global_pruning=True,
                         pruning_ratio=0.4, ignored_layers=[reference.get_submodule(space.classifier)]).step()
    modules = dict(reference.named_modules())
    theirs = np.array([[modules[g.name].out_channels for g in space.groups]], dtype=np.float64)
    assert theirs.min() < min(g.units for g in space.groups)  # it pruned, unevenly
    sampler = StrategySampler(space, float(space.flops_of_kept(theirs)[0]) / space.base_flops, 0.002, 0.95)
    ours = group_importance(model, space.groups, TAYLOR_KINDS if gradients else GROUP_KINDS, gradients)
    assert space.kept_units(global_threshold(sampler, ours, comparable=False)) == theirs[0].astype(int).tolist()


def test_the_iterative_rule_steps_as_torch_pruning_iterative_global_pruning(resnet):
    """Torch-Pruning's MetaPruner(global_pruning=True) with GroupMagnitudeImportance(p=1), stepped to 70% of the
    channels in 20 steps with max_pruning_ratio 0.7: after every step every group keeps as many channels as the
    path says, also once groups are closed at max_ratio (each step re-normalises over the channels left, which no
    single threshold reproduces)."""
    model, space = resnet
    sampler = StrategySampler(space, 0.3, 0.02, 0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = iterative_kept(model, sampler, steps=20)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model left as it was
    reference = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(reference, torch.zeros(1, 3, 32, 32), tp.importance.GroupMagnitudeImportance(p=1),
                                  global_pruning=True, pruning_ratio=0.7, iterative_steps=20, max_pruning_ratio=0.7,
                                  ignored_layers=[reference.get_submodule(space.classifier)])
    modules = dict(reference.named_modules())
    for kept in path:
        pruner.step()
        assert [modules[g.name].out_channels for g in space.groups] == kept.astype(int).tolist()
    units = np.array([g.units for g in space.groups])
    assert (path[-1] < units * 0.3 + 1).any()  # a group reached max_ratio on the way
    assert sampler.measure(kept_ratios(sampler, path[-2:])).tolist() >= [sampler.bands[0][0]] > \
        sampler.measure(kept_ratios(sampler, path[-1:])).tolist()  # it stopped at the first step under the band


def test_the_iterative_baseline_is_its_step_nearest_the_band_middle_within_max_ratio(resnet):
    model, space = resnet
    sampler = StrategySampler(space, 0.5, 0.01, 0.7)
    path = iterative_kept(model, sampler)
    assert np.array_equal(iterative_kept(model, sampler), path)  # deterministic
    found = baselines(sampler, [Ranking("global-l1-iterative", None, False, path)])
    assert [name for name, _ in found] == ["uniform", "global-l1-iterative"]
    ratios = found[1][1]
    assert sampler.contains(ratios) and max(ratios) <= sampler.max_ratio
    steps = kept_ratios(sampler, path)
    inside = steps[sampler.feasible(steps)]
    assert len(inside) > 1 and ratios in inside.tolist()
    assert abs(sampler.measure(np.array([ratios]))[0] - 0.5) == np.abs(sampler.measure(inside) - 0.5).min()
    one_shot = global_threshold(sampler, group_importance(model, space.groups), comparable=False)
    assert space.kept_units(ratios) != space.kept_units(one_shot)


def _prepared(tmp_path, *extra):
    prep = prepare(load_config(None, small(tmp_path / "run", tmp_path / "cache", *extra)))
    randomize_batchnorm(prep.model)  # no ties among the untrained base's |gamma|
    return prep


def test_every_baseline_lands_in_the_band_under_its_own_name(tmp_path):
    prep = _prepared(tmp_path)
    state = {k: v.clone() for k, v in prep.model.state_dict().items()}
    found = baselines(prep.sampler, rankings(prep, BASELINES))
    assert [name for name, _ in found] == list(BASELINES)
    assert all(prep.sampler.contains(ratios) and max(ratios) <= prep.sampler.max_ratio for _, ratios in found)
    assert len({tuple(ratios) for _, ratios in found}) == len(BASELINES)
    assert all(torch.equal(state[k], v) for k, v in prep.model.state_dict().items())  # Taylor left it as it was
    again = baselines(prep.sampler, rankings(prep, BASELINES))
    assert again == found  # a resumed run proposes the same candidates


def test_a_baseline_the_method_or_model_cannot_rank_by_is_left_out(tmp_path):
    unstructured = _prepared(tmp_path, "search.granularity=unstructured")
    assert [name for name, _ in baselines(unstructured.sampler, rankings(unstructured, BASELINES))] == list(LEGACY)
    slimming = _prepared(tmp_path, "search.criterion=bn_scale")  # one BatchNorm per group: the same |gamma|
    assert [name for name, _ in baselines(slimming.sampler, rankings(slimming, BASELINES))] == \
        [name for name in BASELINES if name != "global-bn-scale"]
    sampler = slimming.sampler
    ties = [np.ones(g.units) for g in sampler.space.groups]  # every threshold keeps all or nothing
    assert baselines(sampler, [Ranking("global-bn-scale", ties, True)]) == baselines(sampler, [])


def test_a_run_keeps_the_baselines_it_started_with():
    assert run_baselines(None, started=False) == BASELINES
    assert run_baselines(None, started=True) == LEGACY  # stored candidates before manifests named the baselines
    assert run_baselines(["uniform", "global-taylor"], started=True) == ("uniform", "global-taylor")
    with pytest.raises(ConfigError, match="baseline 'global-lamp' is unknown"):
        run_baselines(["uniform", "global-lamp"], started=True)


def test_taylor_gradients_of_a_partly_frozen_model_are_zero_where_it_is_frozen():
    model = build_model("digits_cnn", 10, 1)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    batch = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    gradients = loss_gradients(model, batch, lambda out: out, F.cross_entropy)
    name = next(n for n, p in model.named_parameters() if p is frozen)
    assert not gradients[name].any() and gradients["fc.weight"].abs().sum() > 0
