"""Tasks (model.task): segmentation's summable statistics, models whose output is not plain logits ((logits, aux),
a dict, a detector's per-cell head) proved exact by the preflight with every head kept, scored by their task, and
the binned mAP@0.5 of the detection example (examples/detection.py), against pycocotools' where it is installed;
the example's search runs end to end in tests/test_examples.py."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples import detection
from examples.shapes import Segmenter
from prunetune.search.config import ConfigError, load_config
from prunetune.search.prepare import task_of
from prunetune.workers.detection import map_statistics, mean_average_precision
from prunetune.workers.data import collate, iterate_batches, load_data
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.groups import SpaceError
from prunetune.workers.preflight import PreflightOptions, preflight
from prunetune.workers.prune import PrunePlan
from prunetune.workers.scoring import score
from prunetune.workers.settings import EvaluationSettings
from prunetune.workers.space import count_flops
from prunetune.workers.tasks import CLASSIFICATION, IGNORE_INDEX, SEGMENTATION, segmentation_score, \
    segmentation_statistics
from tests.coco import coco_map, random_detections


class AuxClassifier(nn.Module):
    """A classifier returning (logits, aux_logits), as Inception and GoogLeNet do in training."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc, self.aux = nn.Linear(16, num_classes), nn.Linear(8, num_classes)

    def forward(self, x):
        early = self.a(x)
        return self.fc(self.b(early).mean((2, 3))), self.aux(early.mean((2, 3)))


def test_segmentation_statistics_sum_exactly_over_batches_and_give_miou_of_the_present_classes():
    logits = torch.zeros(2, 3, 1, 3)
    logits[0, :, 0, :] = torch.tensor([[9., 0, 0], [0, 9, 0], [0, 0, 0]])  # predicts 0, 1, 0
    logits[1, :, 0, :] = torch.tensor([[0., 0, 0], [9, 9, 9], [0, 0, 0]])  # predicts 1, 1, 1
    mask = torch.tensor([[[0, 1, 1]], [[1, 1, IGNORE_INDEX]]])
    whole = segmentation_statistics(logits, mask)
    parts = segmentation_statistics(logits[:1], mask[:1]) + segmentation_statistics(logits[1:], mask[1:])
    assert torch.equal(parts[1:], whole[1:]) and parts[0].item() == pytest.approx(whole[0].item())  # counts, loss
    figures = segmentation_score(whole)
    # class 0: intersection 1, union 2; class 1: intersection 3, union 4; class 2 absent (left out of the mean)
    assert figures["miou"] == pytest.approx((1 / 2 + 3 / 4) / 2) and figures["pixel_accuracy"] == pytest.approx(4 / 5)
    assert figures["loss"] == pytest.approx(F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX).item())


def test_targets_collate_stacked_where_they_share_a_shape_and_as_a_list_where_they_do_not():
    image = torch.zeros(3, 4, 4)
    assert torch.equal(collate([(image, 1), (image, 2)])[1], torch.tensor([1, 2]))
    assert collate([(image, torch.zeros(4, 4)), (image, torch.ones(4, 4))])[1].shape == (2, 4, 4)
    boxes = [torch.zeros(1, 5), torch.zeros(3, 5)]
    x, y = collate([(image, boxes[0]), (image, boxes[1])])
    assert x.shape == (2, 3, 4, 4) and isinstance(y, list) and [len(b) for b in y] == [1, 3]


CASES = {  # model, input, classes, task, the heads the preflight must keep whole
    "(logits, aux) classifier": (lambda: AuxClassifier(3), (1, 8, 8), 3, CLASSIFICATION, ["fc", "aux"]),
    "segmenter returning {out, aux}": (lambda: Segmenter(3, 3, 4), (3, 8, 8), 3, SEGMENTATION, ["head", "aux"]),
    "detector (user task)": (detection.detector, (3, 16, 16), 2, detection.task(), ["head"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_preflight_proves_flops_exact_and_never_prunes_a_head(name):
    make, shape, classes, task, heads = CASES[name]
    torch.manual_seed(0)
    model, example = make().eval(), torch.zeros(1, *shape)
    verdict = preflight(model, example, PreflightOptions(classes, 0.7, lambda space: [0.4] * len(space.groups),
                                                         task=task))
    assert [n for n, _, _ in verdict.checked] == ["most pruned", "first sampled", "least pruned"]
    assert sorted(verdict.space.ignored_layers) == sorted(heads) and verdict.functional
    for ratios in np.random.default_rng(0).uniform(0, 0.7, (2, len(verdict.space.groups))):
        pruned = PrunePlan(model, verdict.space, "l1").apply(ratios).eval()
        assert verdict.space.flops(ratios) == pytest.approx(count_flops(pruned, example).total(), abs=1)
        out = pruned(example)
        base = model(example)
        assert [t.shape for t in _tensors(out)] == [t.shape for t in _tensors(base)]  # every head's width kept


def _tensors(out):
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]


def test_a_prediction_that_does_not_fit_the_task_is_refused_in_one_line():
    with pytest.raises(SpaceError, match=r"^model: task segmentation needs logits of shape \[batch, classes, "
                                         r"height, width\], got \(1, 3\)$"):
        preflight(AuxClassifier(3), torch.zeros(1, 1, 8, 8),
                  PreflightOptions(3, 0.7, lambda s: [0.4] * len(s.groups), task=SEGMENTATION))
    with pytest.raises(SpaceError, match="model: the model returns 2 classes per pixel but the data has 3 classes"):
        preflight(Segmenter(2, 3, 4), torch.zeros(1, 3, 8, 8),
                  PreflightOptions(3, 0.7, lambda s: [0.4] * len(s.groups), task=SEGMENTATION))


def test_the_evaluator_scores_the_first_output_of_a_logits_aux_model():
    torch.manual_seed(0)
    model = AuxClassifier(3).eval()
    data = load_data("tests.data_factory:make", kwargs={"n": 60})
    cfg = EvaluationSettings(calibration_batches=2, batch_size=8, heldout_size=20, bn_mode="none")
    space = preflight(model, torch.zeros(1, 1, 8, 8), PreflightOptions(3, 0.7, lambda s: [0.0] * len(s.groups))).space
    evaluator = CandidateEvaluator(model, space, data, cfg, "cpu")
    record = evaluator.evaluate(np.zeros(len(space.groups)))
    heldout = iterate_batches(data.train, evaluator.heldout_indices, 8)
    want = score(nn.Sequential(model, _First()), heldout)
    assert record.metrics == {"accuracy": want["accuracy"], "loss": pytest.approx(want["loss"])}
    assert record.accuracy == record.score == want["accuracy"]


class _First(nn.Module):
    def forward(self, out):
        return out[0]


def test_a_task_that_names_none_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="^model.task: unknown task 'detection'; allowed: classification, "
                                          "segmentation, yolo or package.module:function$"):
        load_config(None, ["model.task=detection"])
    with pytest.raises(ConfigError, match=r"^model.task: os:getcwd\(\) must return a prunetune.workers.tasks.Task, "
                                          "it returned str$"):
        task_of(load_config(None, ["model.task=os:getcwd"]))
    with pytest.raises(ConfigError, match="^finetune.label_smoothing: classification only; model.task is "
                                          "segmentation$"):
        load_config(None, ["model.task=segmentation", "finetune.label_smoothing=0.1"])


def _box(cls: int, x0: float, y0: float, side: float = 4) -> list[float]:
    return [cls, x0, y0, x0 + side, y0 + side]


def test_map_statistics_sum_exactly_over_images_and_give_the_all_point_ap():
    truths = [torch.tensor([_box(0, 0, 0), _box(0, 8, 8), _box(1, 0, 8)]), torch.tensor([_box(0, 12, 0)])]
    found = [(torch.tensor([[0., 0, 4, 4], [0, 0, 4, 4], [8, 8, 12, 12], [1, 8, 5, 12], [0, 8, 4, 12]]),
              torch.tensor([0.9, 0.8, 0.6, 0.7, 0.05]), torch.tensor([0, 0, 0, 0, 1])),  # hit, duplicate, hit,
             # overlaps the class-1 box at IoU 0.6 with the wrong class, and the class-1 box at low score
             (torch.tensor([[12., 0, 16, 4], [0, 0, 4, 4]]), torch.tensor([0.55, 0.95]), torch.tensor([0, 1]))]
    whole = map_statistics(found, truths, 2)
    assert torch.equal(whole, map_statistics(found[:1], truths[:1], 2) + map_statistics(found[1:], truths[1:], 2))
    assert whole[:2].tolist() == [3, 1]
    # class 0 by score: 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP, 0.55 TP -> recall 1/3, 1/3, 1/3, 2/3, 1 at precision
    # 1, 1/2, 1/3, 1/2, 3/5: envelope 1, 3/5, 3/5, 3/5, 3/5 -> AP 1/3 + 1/3 * 3/5 + 1/3 * 3/5
    # class 1: 0.95 FP (no class-1 box there), 0.05 TP -> recall 1 at precision 1/2 -> AP 1/2
    assert mean_average_precision(whole, 2) == pytest.approx(((1 + 3 / 5 + 3 / 5) / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_binned_map_agrees_with_pycocotools_on_random_boxes(seed):
    pytest.importorskip("pycocotools", reason="pycocotools not installed (the test extra has it)")
    found, truths = random_detections(seed)
    want = coco_map(found, truths)
    got = mean_average_precision(map_statistics(found, truths, classes=3), classes=3)
    # COCOeval orders every detection and interpolates at 101 recall points; ours takes the all-point area over
    # 1000 score bins
    assert 0.2 < want < 0.95 and got == pytest.approx(want, abs=0.01)
