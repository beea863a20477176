"""The worker pipeline: prune, adaptive BN, score, evaluator, fine-tune (plain torch, no Ray)."""
import copy
import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from prunetune import (CandidateEvaluator, EvaluationSettings, FinetuneOptions, PrunePlan, PruningSpace,
                       StrategySampler, build_model, finetune, load_config, load_data, prune, recalibrate_bn, score)
from prunetune.search.config import training_recipe
from prunetune.workers.data import TensorImages, iterate_batches
from prunetune.workers.evaluator import CandidateError
from tests.archs import NoBatchNorm, randomize_batchnorm


class TwoLayer(nn.Module):
    """conv(2->4) -> BN -> conv(4->2): hand-set filters to check what each criterion keeps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            # filter L1 norms 4, 3, 3.6, 0.1 keep {0, 2}; squared L2 norms 8, 9, 7.46, 0.01 keep {0, 1}
            self.conv.weight.copy_(torch.tensor([[2.0, 2.0], [3.0, 0.0], [2.5, -1.1], [0.1, 0.0]]).view(4, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor([0.1, 0.9, 0.5, 0.3]))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


@pytest.mark.parametrize("criterion, kept", [("l1", [0, 2]), ("l2", [0, 1]), ("bn_scale", [1, 2])])
def test_criteria_keep_the_right_filters(criterion, kept):
    model = TwoLayer()
    space = PruningSpace.from_model(model, torch.zeros(1, 2, 3, 3))
    assert [g.units for g in space.groups] == [4]
    pruned = prune(model, space, [0.5], criterion)
    assert torch.equal(pruned.conv.weight, model.conv.weight[kept])
    assert torch.equal(pruned.bn.weight, model.bn.weight[kept])
    assert torch.equal(pruned.head.weight[:, :, 0, 0], model.head.weight[:, kept, 0, 0])


def test_random_criterion_is_seeded():
    model = build_model("resnet20", 10)
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))
    ratios = [0.5] * len(space.groups)
    a, b = PrunePlan(model, space, "random", seed=1), PrunePlan(model, space, "random", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.order, b.order))
    assert not all(np.array_equal(x, y) for x, y in zip(a.order, PrunePlan(model, space, "l1").order))
    assert a.apply(ratios).conv1.weight.shape[0] == 8


def test_zero_ratios_give_the_base_network():
    model = randomize_batchnorm(build_model("mobilenet_v1", 10)).eval()
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))
    pruned = prune(model, space, [0.0] * len(space.groups))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), model(x))


def test_pruned_model_is_a_real_smaller_network_that_saves_and_loads():
    model = build_model("resnet20", 10)
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))
    ratios = StrategySampler(space, 0.5, 0.02, 0.7).sample(0)
    pruned = prune(model, space, ratios)
    assert sum(p.numel() for p in pruned.parameters()) == space.params(ratios) < space.base_params
    clone = pickle.loads(pickle.dumps(pruned))
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), pruned.eval()(x))
    assert model.conv1.weight.shape[0] == 16  # the base model is untouched


def test_pruned_copy_shares_no_tensor_or_hook_with_the_base_model():
    model = randomize_batchnorm(build_model("resnet20", 10))
    # prune the inner channels only: the residual-stream BNs and convs keep their shapes but must still be copies
    ignored = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.endswith(".conv1")]
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32), ignored_layers=ignored)
    before = copy.deepcopy(model.state_dict())
    pruned = prune(model, space, [0.5] * len(space.groups))
    base_storage = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not base_storage & {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
    pruned.layer1[0].bn2.register_forward_hook(lambda *a: None)
    assert not model.layer1[0].bn2._forward_hooks
    recalibrate_bn(pruned.train(), [torch.randn(8, 3, 32, 32)], mode="cumulative")
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_pruning_copy_keeps_shared_modules_and_tied_weights_shared():
    from prunetune.workers.prune import clone_module

    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4))
    model[3].weight = shared.weight  # tied
    clone = clone_module(model, {})
    assert clone[0] is clone[2] and clone[0] is not shared
    assert clone[3].weight is clone[0].weight and clone[0].weight is not shared.weight
    assert torch.equal(clone[0].weight, shared.weight)


def _stats_hooks(model):
    seen = {}

    def hook(module, inputs, output):
        x = inputs[0].transpose(0, 1).flatten(1).double()
        seen.setdefault(module, []).append((x.mean(1), x.var(1, unbiased=True)))

    return seen, [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_cumulative_adaptive_bn_equals_the_statistics_of_the_batches():
    model = randomize_batchnorm(build_model("resnet20", 10))
    batches = [torch.randn(16, 3, 32, 32) * 2 + 1 for _ in range(5)]
    seen, hooks = _stats_hooks(model)
    assert recalibrate_bn(model, batches, "cumulative") == 5
    for h in hooks:
        h.remove()
    for bn, stats in seen.items():
        mean = torch.stack([m for m, _ in stats]).mean(0)
        var = torch.stack([v for _, v in stats]).mean(0)
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5)
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.1 and not bn.training


def test_ema_adaptive_bn_keeps_the_momentum():
    model = randomize_batchnorm(build_model("digits_cnn", 10, 1))
    before = model.features[1].running_mean.clone()
    batch = torch.randn(32, 1, 8, 8)
    seen, hooks = _stats_hooks(model)
    recalibrate_bn(model, [batch], "ema")
    for h in hooks:
        h.remove()
    bn = model.features[1]
    expected = 0.9 * before.double() + 0.1 * seen[bn][0][0]
    assert torch.allclose(bn.running_mean.double(), expected, atol=1e-5)


def test_model_without_batchnorm_is_scored_with_a_warning():
    model = NoBatchNorm()
    with pytest.warns(UserWarning, match="no BatchNorm"):
        assert recalibrate_bn(model, [torch.randn(4, 1, 8, 8)], "cumulative") == 0
    data = load_data("digits")
    cfg = EvaluationSettings(calibration_batches=2, batch_size=32)
    space = PruningSpace.from_model(model, data.example_input())
    evaluator = CandidateEvaluator(model, space, data, cfg, "cpu")
    result = evaluator.evaluate([0.3] * len(space.groups))
    assert result.bn_recalibrated is False and "no BatchNorm" in result.warning


@pytest.fixture(scope="module")
def digits_setup():
    torch.manual_seed(0)
    data = load_data("digits")
    cfg = load_config(None, ["evaluation.calibration_batches=5", "evaluation.batch_size=64",
                             "finetune.epochs=2", "finetune.batch_size=64"])
    model = build_model("digits_cnn", 10, 1)
    finetune(model, data, dataclasses.replace(training_recipe(cfg), epochs=4))
    space = PruningSpace.from_model(model, data.example_input())
    return data, cfg, model, space


def test_evaluator_is_deterministic_and_complete(digits_setup):
    data, cfg, model, space = digits_setup
    evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
    ratios = StrategySampler(space, 0.5, 0.02, 0.7).sample(1)
    a, b = evaluator.evaluate(ratios, index=1), evaluator.evaluate(ratios, index=1)
    for key in ("score", "accuracy", "loss", "flops", "params"):
        assert getattr(a, key) == getattr(b, key)
    assert a.index == 1 and a.ok and a.ratios == list(ratios)
    assert a.flops == space.flops(ratios) and abs(a.flops_ratio - 0.5) <= 0.02
    assert a.bn_recalibrated and a.device == "cpu" and min(a.t_prune, a.t_calibrate, a.t_score) > 0
    # the held-out split and the calibration batches never share a sample
    assert not set(evaluator.heldout_indices) & set(evaluator.calibration_indices)
    assert len(evaluator.heldout_x) == cfg.evaluation.heldout_size
    assert len(evaluator.calibration) == 5 * 64


def test_adaptive_bn_beats_inherited_statistics(digits_setup):
    data, cfg, model, space = digits_setup
    settings = cfg.evaluation.settings()
    adaptive, vanilla = (CandidateEvaluator(model, space, data, c, "cpu")
                         for c in (settings, dataclasses.replace(settings, bn_mode="none")))
    sampler = StrategySampler(space, 0.4, 0.02, 0.7)
    gains = [adaptive.evaluate(sampler.sample(i)).accuracy - vanilla.evaluate(sampler.sample(i)).accuracy
             for i in range(6)]
    assert np.mean(gains) > 0.05


def test_nan_loss_is_a_candidate_error(digits_setup):
    data, cfg, model, space = digits_setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.bias.fill_(float("nan"))
    evaluator = CandidateEvaluator(broken, space, data, cfg.evaluation.settings(), "cpu")
    with pytest.raises(CandidateError, match="held-out loss is nan"):
        evaluator.evaluate([0.2] * len(space.groups))


def test_score_is_deterministic(digits_setup):
    data, _, model, _ = digits_setup
    assert score(model, iterate_batches(data.test, range(200), 50)) == \
        score(model, iterate_batches(data.test, range(200), 50))


def test_finetune_resumes_to_the_same_result(digits_setup, tmp_path):
    data, cfg, model, space = digits_setup
    ratios = StrategySampler(space, 0.5, 0.02, 0.7).sample(2)
    ckpt = str(tmp_path / "ft.pt")

    def fresh():
        torch.manual_seed(123)  # the caller's RNG state must not matter: finetune seeds itself
        return prune(model, space, ratios)

    full = fresh()
    finetune(full, data, cfg.finetune.settings(), FinetuneOptions(checkpoint_path=str(tmp_path / "full.pt")))

    class Stop(Exception):
        pass

    def interrupt(epoch, metrics, path):
        if epoch == 0:
            raise Stop()

    first = fresh()
    with pytest.raises(Stop):
        finetune(first, data, cfg.finetune.settings(), FinetuneOptions(checkpoint_path=ckpt, on_epoch=interrupt))
    resumed = fresh()
    result = finetune(resumed, data, cfg.finetune.settings(), FinetuneOptions(checkpoint_path=ckpt))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_distillation_learns_from_the_teacher_not_the_labels(digits_setup):
    data, cfg, model, space = digits_setup
    train = data.train_augmented  # the same images with shuffled labels: only the teacher knows the classes
    shuffled = torch.from_numpy(np.random.default_rng(0).permutation(train.labels.numpy()))
    scrambled = dataclasses.replace(data, train_augmented=TensorImages(
        train.images, shuffled, train.mean.flatten().tolist(), train.std.flatten().tolist(), train.scale, train.pad,
        train.flip, augment=True))
    accuracy = {}
    for weight in (0.0, 1.0):
        ft = dataclasses.replace(cfg.finetune.settings(), distill_weight=weight, epochs=2)
        student = prune(model, space, [0.5] * len(space.groups))
        accuracy[weight] = finetune(student, scrambled, ft, FinetuneOptions(teacher=model))["test_accuracy"]
    assert accuracy[1.0] > 0.6 and accuracy[0.0] < 0.4, accuracy


def test_evaluation_data_stays_uint8_and_scores_as_normalised_floats_do(digits_setup):
    from prunetune.workers.evaluator import evaluation_data

    data, cfg, model, space = digits_setup
    raw = evaluation_data(data, cfg.evaluation.settings())
    assert raw.calibration.dtype == np.uint8 and raw.heldout_x.dtype == np.uint8  # 4x less memory than float32

    def normalised(x):
        return ((torch.from_numpy(x).float() * raw.scale - torch.from_numpy(raw.mean).view(1, -1, 1, 1))
                / torch.from_numpy(raw.std).view(1, -1, 1, 1)).numpy()

    floats = dataclasses.replace(raw, calibration=normalised(raw.calibration), heldout_x=normalised(raw.heldout_x),
                                 scale=1.0, mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))
    ratios = StrategySampler(space, 0.5, 0.02, 0.7).sample(4)
    a = CandidateEvaluator(model, space, raw, cfg.evaluation.settings(), "cpu").evaluate(ratios)
    b = CandidateEvaluator(model, space, floats, cfg.evaluation.settings(), "cpu").evaluate(ratios)
    assert (a.score, a.loss) == (b.score, b.loss)


def test_calibration_stops_once_the_statistics_have_converged():
    model = randomize_batchnorm(build_model("resnet20", 10))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(40)]
    used = recalibrate_bn(model, batches, "cumulative", tolerance=0.01)
    assert 3 <= used < 40
    assert recalibrate_bn(reference, batches, "cumulative") == 40
    for a, b in zip(model.modules(), reference.modules()):  # close to the statistics of every batch
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=0.05, rtol=0.05)
