"""torchvision detectors as a user task (`model.task: examples.torchvision_detection:ssdlite_task`): FCOS, RetinaNet,
SSD, SSDlite and Faster R-CNN's backbone + FPN + RPN wrapped so that prunetune can prune, score and fine-tune them.

prunetune calls a model on a batch of images and hands its output to the task; a torchvision detector instead takes
targets, resizes and normalises inside, and returns losses or post-processed boxes. `RawHeads` keeps the
detector's normalisation, backbone (+ FPN) and head, and returns the head's raw per-level maps (class logits, box
regression, FCOS's centerness; the RPN's objectness and box deltas), in training and in eval mode alike, so the
preflight leaves the head's last convs whole and proves the rest exact. The task turns the maps back into what the
detector's own code takes (flattened as its head flattens them, anchors from its anchor generator for the image
size) and calls it: the training loss is the detector's `compute_loss` (the RPN's for `rpn`), summed over its
terms; the held-out figures are the mAP@0.5:0.95 and mAP@0.5 of the detector's `postprocess_detections` (its
score threshold, NMS and detection cap; the RPN's class-agnostic proposals for `rpn`) from prunetune's summable
statistics (`prunetune.workers.detection`), and the mean loss. Images are fed at the task's size, unresized.

Needs torchvision (a torch it imports beside: not the CPU wheel CI uses). Random weights only: the detectors are built
with weights=None, weights_backbone=None. `bench/torchvision_detection.py` searches SSDlite end to end on `data`.
"""
from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.detection import Squares
from prunetune.workers.detection import COCO_IOUS, BINS, average_precisions, map_statistics
from prunetune.workers.tasks import Task

# image side (160: FCOS's P7 map is 2 x 2; at 128 it is 1 x 1, where a GroupNorm group pruned to one channel has a
# single value to normalise, which torch refuses), object classes, FPN and head channels of fcos and retinanet
IMAGE, CLASSES, WIDTH = 160, 2, 64
FAMILIES = ("fcos", "retinanet", "ssd", "ssdlite", "rpn")
SINGLE_SHOT = ("ssd", "ssdlite")  # a head per level (module_list), matched by the detector
BACKGROUND = {"ssd": 1, "ssdlite": 1, "rpn": 1}  # label 0 is the background class: the data's classes move up by one


def image_size_of(family: str) -> int:
    """The side the family is fed at: IMAGE, or 300 for ssd (its VGG extras reduce a 300 px input to 1 x 1)."""
    return 300 if family == "ssd" else IMAGE


def data(train_size: int = 256, test_size: int = 64, image_size: int = IMAGE) -> tuple:
    """The data factory: squares of CLASSES classes on noise, boxes [k, 5] (class, x0, y0, x1, y1 in pixels)."""
    return Squares(train_size, 0, image_size), Squares(test_size, 1, image_size), CLASSES


def detector(family: str, num_classes: int = CLASSES, width: int = WIDTH) -> nn.Module:
    """A torchvision detector of `family` with random weights: fcos and retinanet on a ResNet-18 + FPN of `width`
    channels (P3-P7), ssd300_vgg16 (at 300 px: its last layers need it), ssdlite320_mobilenet_v3_large,
    fasterrcnn_mobilenet_v3_large_320_fpn (for its RPN)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import (FCOS, RetinaNet, fasterrcnn_mobilenet_v3_large_320_fpn,
                                              ssd300_vgg16, ssdlite320_mobilenet_v3_large)
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if family in ("fcos", "retinanet"):
        backbone = BackboneWithFPN(resnet18(weights=None), {"layer2": "0", "layer3": "1", "layer4": "2"},
                                   [128, 256, 512], width, LastLevelP6P7(width, width))
        # score_thresh 0.05 for both (FCOS's default is 0.2), so that a weak model still has detections to rank
        cls = FCOS if family == "fcos" else RetinaNet
        return cls(backbone, num_classes, min_size=IMAGE, max_size=IMAGE, score_thresh=0.05)
    if family in SINGLE_SHOT:
        build = ssd300_vgg16 if family == "ssd" else ssdlite320_mobilenet_v3_large
        return build(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    if family == "rpn":
        return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    raise ValueError(f"family: unknown '{family}'; allowed: {', '.join(FAMILIES)}")


def head_of(family: str, model: nn.Module) -> nn.Module:
    """The module whose convs give the raw maps: the detector's head (the RPN's for `rpn`)."""
    return model.rpn.head if family == "rpn" else model.head


def raw_maps(family: str, head: nn.Module, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The head's raw maps of every level, kind after kind: class logits [N, A * K, H, W] then box regression
    [N, A * 4, H, W] (then FCOS's centerness [N, A, H, W]; the RPN: objectness [N, A, H, W], box deltas)."""
    if family == "rpn":
        objectness, deltas = head(features)
        return list(objectness) + list(deltas)
    cls, box = head.classification_head, head.regression_head
    if family in SINGLE_SHOT:
        return [m(f) for m, f in zip(cls.module_list, features)] + [m(f) for m, f in zip(box.module_list, features)]
    logits = [cls.cls_logits(cls.conv(f)) for f in features]
    if family == "retinanet":
        return logits + [box.bbox_reg(box.conv(f)) for f in features]
    shared = [box.conv(f) for f in features]  # fcos: box regression (through a ReLU) and centerness share a trunk
    return logits + [F.relu(box.bbox_reg(s)) for s in shared] + [box.bbox_ctrness(s) for s in shared]


class RawHeads(nn.Module):
    """A torchvision detector's normalisation, backbone (+ FPN) and head, returning the head's raw maps."""

    def __init__(self, family: str, model: nn.Module):
        super().__init__()
        self.family, self.backbone, self.head = family, model.backbone, head_of(family, model)
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone((x - self.mean) / self.std)
        return raw_maps(self.family, self.head, list(features.values()))


def raw_heads(family: str = "fcos", num_classes: int = CLASSES, width: int = WIDTH) -> RawHeads:
    """The model factory (model.name: examples.torchvision_detection:raw_heads, model.kwargs: {family: ...})."""
    return RawHeads(family, detector(family, num_classes, width))


def _flat(m: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, A * columns, H, W] -> [N, H * W * A, columns], as torchvision's heads flatten their maps."""
    n, _, h, w = m.shape
    return m.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)


@lru_cache(maxsize=8)
def _reference(family: str, classes: int) -> nn.Module:
    """A detector of the family whose weightless parts (anchors, box coder, matcher, loss, post-processing) the task
    calls; its own weights are never used."""
    return detector(family, classes).eval()


class Decoded:
    """The raw maps of a batch as the detector's own code takes them: flattened head outputs, anchors per image,
    anchors per level."""

    def __init__(self, family: str, maps: list[torch.Tensor], classes: int, image_size: int):
        from torchvision.models.detection.image_list import ImageList

        self.family, self.model = family, _reference(family, classes)
        kinds = 3 if family == "fcos" else 2
        levels = len(maps) // kinds
        cls, box = maps[:levels], maps[levels:2 * levels]
        n = cls[0].shape[0]
        columns = 1 if family == "rpn" else classes + BACKGROUND.get(family, 0)
        self.outputs = {"cls_logits": torch.cat([_flat(m, columns) for m in cls], 1),
                        "bbox_regression": torch.cat([_flat(m, 4) for m in box], 1)}
        if kinds == 3:
            self.outputs["bbox_ctrness"] = torch.cat([_flat(m, 1) for m in maps[2 * levels:]], 1)
        self.per_level = [m.shape[1] // columns * m.shape[2] * m.shape[3] for m in cls]
        generator = self.model.rpn.anchor_generator if family == "rpn" else self.model.anchor_generator
        self.sizes = [(image_size, image_size)] * n
        self.anchors = generator(ImageList(cls[0].new_empty((0, 0, image_size, image_size)), self.sizes), cls)

    def loss(self, targets: list[dict]) -> torch.Tensor:
        """The detector's training loss (the sum of its terms) against torchvision targets."""
        model, outputs, anchors = self.model, self.outputs, self.anchors
        if self.family == "fcos":
            losses = model.compute_loss(targets, outputs, anchors, self.per_level)
        elif self.family == "retinanet":
            losses = model.compute_loss(targets, outputs, anchors)
        elif self.family in SINGLE_SHOT:
            from torchvision.ops import box_iou

            matched = [model.proposal_matcher(box_iou(t["boxes"], a)) if len(t["boxes"]) else
                       torch.full((len(a),), -1, dtype=torch.int64, device=a.device) for t, a in zip(targets, anchors)]
            losses = model.compute_loss(targets, outputs, anchors, matched)
        else:
            rpn = model.rpn
            labels, boxes = rpn.assign_targets_to_anchors(anchors, targets)
            regression = rpn.box_coder.encode(boxes, anchors)
            losses = dict(zip(("objectness", "rpn_box"), rpn.compute_loss(
                outputs["cls_logits"].flatten(0, 1), outputs["bbox_regression"].flatten(0, 1), labels, regression)))
        return sum(losses.values())

    def detections(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image, the detector's post-processed detections (boxes, scores, classes from 0; the RPN's proposals,
        all of class 0), on the CPU."""
        model = self.model
        outputs = {k: v.detach().float() for k, v in self.outputs.items()}
        if self.family == "rpn":
            rpn = model.rpn
            proposals = rpn.box_coder.decode(outputs["bbox_regression"].flatten(0, 1), self.anchors)
            proposals = proposals.view(len(self.sizes), -1, 4)
            boxes, scores = rpn.filter_proposals(proposals, outputs["cls_logits"], self.sizes, self.per_level)
            return [(b.cpu(), s.cpu(), torch.zeros(len(b), dtype=torch.long)) for b, s in zip(boxes, scores)]
        if self.family in SINGLE_SHOT:
            found = model.postprocess_detections(outputs, self.anchors, self.sizes)
        else:
            split = {k: list(v.split(self.per_level, 1)) for k, v in outputs.items()}
            found = model.postprocess_detections(split, [list(a.split(self.per_level)) for a in self.anchors],
                                                 self.sizes)
        shift = BACKGROUND.get(self.family, 0)
        return [(d["boxes"].cpu(), d["scores"].cpu(), d["labels"].cpu() - shift) for d in found]


def targets_of(family: str, boxes: list[torch.Tensor], device) -> list[dict]:
    """Box lists [k, 5] (class, x0, y0, x1, y1) as torchvision targets (labels moved past a background class)."""
    shift = BACKGROUND.get(family, 0)
    return [{"boxes": b[:, 1:].float().to(device), "labels": b[:, 0].long().to(device) + shift} for b in boxes]


def task(family: str, classes: int = CLASSES, image_size: int | None = None) -> Task:
    """The task of a RawHeads model of `family` fed images of `image_size` (default: image_size_of(family)): its
    detector's loss, its detections' mAP@0.5:0.95 (primary) and mAP@0.5, the mean loss; no distillation (the maps
    are not one distribution)."""
    image_size = image_size or image_size_of(family)
    scored = 1 if family == "rpn" else classes  # the RPN's proposals are of one class, "object"

    def loss(maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        return Decoded(family, maps, classes, image_size).loss(targets_of(family, boxes, maps[0].device))

    def statistics(maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        decoded = Decoded(family, [m.float() for m in maps], classes, image_size)
        with torch.no_grad():
            total = float(decoded.loss(targets_of(family, boxes, maps[0].device)))
        truths = [b.float().cpu() if family != "rpn" else torch.cat([torch.zeros(len(b), 1), b[:, 1:].float().cpu()], 1)
                  for b in boxes]
        head = torch.tensor([total * len(boxes), len(boxes)], dtype=torch.float64)
        return torch.cat([head, map_statistics(decoded.detections(), truths, scored, ious=COCO_IOUS)])

    def score(s: torch.Tensor) -> dict:
        ap, present = average_precisions(s[2:], scored, BINS)
        found = ap[:, present] if present.any() else torch.zeros(len(COCO_IOUS), 1, dtype=torch.float64)
        return {"map50_95": float(found.mean()), "map50": float(found[0].mean()), "loss": float(s[0] / s[1])}

    def check(maps: list[torch.Tensor], num_classes: int) -> str | None:
        if num_classes != classes:
            return f"the task was made for {classes} classes, the data has {num_classes}; task({family!r}, classes=...)"
        return None

    return Task(family, ("map50_95", "map50", "loss"), list, loss, statistics, score, check, distill=False)


# model.task of each family, beside model.name examples.torchvision_detection:raw_heads and model.kwargs {family: ...}
fcos_task, retinanet_task, ssd_task, ssdlite_task, rpn_task = (partial(task, family) for family in FAMILIES)
