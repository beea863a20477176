"""model.task `yolo`: detectors with an Ultralytics-style Detect head (YOLOv5u/v8/v9/11/12: anchor-free, a DFL of
reg_max bins per box side), scored by mAP@0.5:0.95 and mAP@0.5 on the held-out split.

The prediction is the head's raw per-scale maps [N, 4 * reg_max + classes, H, W], taken from what the model
returns as Ultralytics' Detect returns it: in training the raw prediction, in eval (decoded, raw prediction); the
raw prediction is the list of maps (Ultralytics 8.3 and before) or a dict of "boxes" [N, 4 * reg_max, A], "scores"
[N, classes, A] and "feats" (8.4), whose flat anchors are cut back into the maps. An 8.4 Segment head (YOLOv8-seg)
returns ((decoded, mask prototypes), raw prediction) in eval and its dict has mask keys beside: it is read by its
boxes alone (its masks are neither scored nor trained). Targets are YOLO labels per image, [k, 5] (class, cx, cy, w,
h, normalised to the image).

Scoring needs nothing but torch: boxes are decoded as Ultralytics decodes them (the DFL's expectation of each side's
distance from the anchor point, cell centres), in coordinates normalised to the image (each map covers the whole
input, so no stride is needed); every (anchor, class) pair scoring over CONF is a candidate (multi-label, as
Ultralytics' validation), the MAX_NMS best per image go through a greedy per-class NMS at IoU NMS_IOU
(workers/detection.py: torchvision's NMS does not import beside the CPU torch), the MAX_DET best are kept, and
their summable statistics give mAP over COCO's thresholds 0.5:0.95 (the primary metric) and at 0.5. The held-out
figures have no loss (it would need Ultralytics).

Training (the base model, fine-tuning) uses Ultralytics' own loss, v8DetectionLoss with its default gains (box 7.5,
cls 0.5, dfl 1.5), built for the maps' class count, reg_max and strides (the first map's stride taken as 8; the
loss depends only on the strides' ratios); it needs the `yolo` extra (ultralytics >= 8.4), and a run without it is
refused before anything is trained.
"""
from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from .detection import BINS, COCO_IOUS, Detections, average_precisions, map_statistics, nms
from .errors import BadInput
from .tasks import Task

REG_MAX = 16  # DFL bins per box side in every Ultralytics detector but YOLO26's (1, end-to-end: not handled)
CONF, NMS_IOU, MAX_DET, MAX_NMS = 0.001, 0.7, 300, 3000  # Ultralytics' validation: 0.001, 0.7, 300, 30,000
FIRST_STRIDE = 8  # the finest map's stride (P3) in Ultralytics' detectors: only the strides' ratios matter
EXTRA = "pip install 'prunetune[yolo]'"


class YoloError(BadInput, ValueError):
    """A YOLO task that cannot run here: a model output it cannot read, or training without ultralytics."""


def _decoded(output: Any) -> bool:
    """True for a head's decoded eval output: [N, C, A] (Detect), or (that, the mask prototypes) (Segment)."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], torch.Tensor):
        output = output[0]
    return isinstance(output, torch.Tensor) and output.dim() == 3


def raw_maps(output: Any) -> list[torch.Tensor]:
    """The per-scale raw maps [N, 4 * reg_max + classes, H, W] in a YOLO model's output (train or eval mode, the
    maps or Ultralytics 8.4's dict); ValueError saying what it found otherwise."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and _decoded(output[0]) and \
            not isinstance(output[1], torch.Tensor):
        output = output[1]  # eval: (decoded, raw)
    if isinstance(output, dict):
        if "one2many" in output:
            raise ValueError("an end-to-end head (one2many and one2one branches: YOLOv10, YOLO26) is not supported")
        if not {"boxes", "scores", "feats"} <= set(output):
            raise ValueError(f"a dict with keys {sorted(output)}, not Ultralytics' boxes, scores and feats")
        feats = output["feats"]
        flat = torch.cat((output["boxes"], output["scores"]), 1).split([f.shape[2] * f.shape[3] for f in feats], 2)
        return [m.reshape(m.shape[0], m.shape[1], f.shape[2], f.shape[3]) for m, f in zip(flat, feats)]
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, torch.Tensor) and t.dim() == 4
                                                            for t in output):
        return list(output)
    raise ValueError(f"no per-scale maps [N, C, H, W] in a {type(output).__name__}")


def decode(maps: list[torch.Tensor], reg_max: int = REG_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [N, A, 4] (x0, y0, x1, y1 normalised to the image) and class scores [N, A, classes] (sigmoid) of the
    raw maps, anchors in Ultralytics' order (scale by scale, row by row)."""
    boxes, scores = [], []
    for m in maps:
        n, _, h, w = m.shape
        box, cls = m.float().flatten(2).split((4 * reg_max, m.shape[1] - 4 * reg_max), 1)
        box = box.view(n, 4, reg_max, h * w)
        bins = torch.arange(reg_max, dtype=box.dtype, device=box.device).view(1, 1, -1, 1)
        left, top, right, bottom = (box.softmax(2) * bins).sum(2).unbind(1) if reg_max > 1 else box[:, :, 0].unbind(1)
        y, x = torch.meshgrid(torch.arange(h, device=m.device) + 0.5, torch.arange(w, device=m.device) + 0.5,
                              indexing="ij")
        x, y = x.flatten(), y.flatten()
        boxes.append(torch.stack(((x - left) / w, (y - top) / h, (x + right) / w, (y + bottom) / h), -1))
        scores.append(cls.sigmoid().transpose(1, 2))
    return torch.cat(boxes, 1), torch.cat(scores, 1)


def detections(maps: list[torch.Tensor], reg_max: int = REG_MAX) -> list[Detections]:
    """Per image, what validation keeps: (anchor, class) pairs over CONF, the MAX_NMS best, greedy per-class NMS at
    NMS_IOU, the MAX_DET best (boxes normalised, scores, classes; on the CPU)."""
    boxes, scores = decode([m.detach() for m in maps], reg_max)
    found = []
    for b, s in zip(boxes, scores):
        anchor, cls = torch.nonzero(s > CONF, as_tuple=True)
        confidence = s[anchor, cls]
        best = torch.argsort(confidence, descending=True, stable=True)[:MAX_NMS]
        b, confidence, cls = b[anchor[best]], confidence[best], cls[best]
        keep = nms(b, confidence, cls, NMS_IOU, MAX_DET)
        found.append((b[keep].cpu(), confidence[keep].cpu(), cls[keep].cpu()))
    return found


def corners(labels: torch.Tensor) -> torch.Tensor:
    """YOLO labels [k, 5] (class, cx, cy, w, h) as [k, 5] (class, x0, y0, x1, y1)."""
    labels = labels.float().cpu().view(-1, 5)
    half = labels[:, 3:] / 2
    return torch.cat((labels[:, :1], labels[:, 1:3] - half, labels[:, 1:3] + half), 1)


def classes_of(maps: list[torch.Tensor], reg_max: int) -> int:
    """The class count of raw maps with `reg_max` bins per box side."""
    return maps[0].shape[1] - 4 * reg_max


def _check(reg_max: int):
    def check(prediction: list[torch.Tensor], num_classes: int) -> str | None:
        channels = {m.shape[1] for m in prediction}
        if len(channels) != 1:
            return f"task yolo needs maps of one channel count, got {[tuple(m.shape) for m in prediction]}"
        if channels.pop() != 4 * reg_max + num_classes:
            return (f"task yolo needs maps of 4 x {reg_max} (reg_max) + {num_classes} (classes) = "
                    f"{4 * reg_max + num_classes} channels, got {prediction[0].shape[1]} (another reg_max needs a task "
                    "function returning prunetune.workers.yolo.task(reg_max=...))")
        return None
    return check


def _statistics(reg_max: int):
    def statistics(prediction: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """map_statistics over COCO's thresholds of the maps' detections against the images' labels."""
        return map_statistics(detections(prediction, reg_max), [corners(t) for t in labels],
                              classes_of(prediction, reg_max), ious=COCO_IOUS)
    return statistics


def score(s: torch.Tensor) -> dict:
    """mAP@0.5:0.95 and mAP@0.5 of summed statistics."""
    classes = len(s) // (1 + BINS * (1 + len(COCO_IOUS)))
    ap, present = average_precisions(s, classes)
    if not present.any():
        return {"map50_95": 0.0, "map50": 0.0}
    return {"map50_95": float(ap[:, present].mean()), "map50": float(ap[0, present].mean())}


@lru_cache(maxsize=8)
def _criterion(classes: int, reg_max: int, strides: tuple[float, ...], device: str):
    """Ultralytics' v8DetectionLoss for a head of this shape, with Ultralytics' default hyperparameters."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    holder = nn.Module()  # what v8DetectionLoss reads of a DetectionModel: args, model[-1], a parameter's device
    holder.register_parameter("device", nn.Parameter(torch.empty(0, device=device)))
    holder.args = get_cfg()
    head = SimpleNamespace(stride=torch.tensor(strides), nc=classes, reg_max=reg_max)
    holder.model = [head]  # type: ignore[assignment]  # a plain attribute (v8DetectionLoss reads model[-1])
    return v8DetectionLoss(holder)


def ultralytics_missing() -> str | None:
    """Why Ultralytics' loss cannot be used here (None: it can)."""
    try:
        from ultralytics.utils.loss import v8DetectionLoss  # noqa: F401
    except Exception as e:  # not installed, or installed against another torch
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"task yolo trains (the base model, fine-tuning) with Ultralytics' loss, and ultralytics does not "
                f"import here ({reason[:200]}); {EXTRA} (scoring needs no ultralytics: prunetune inspect works "
                "without it)")
    return None


def _loss(reg_max: int):
    def loss(prediction: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Ultralytics' v8DetectionLoss (box + cls + dfl, their gains) per image."""
        missing = ultralytics_missing()
        if missing:
            raise YoloError(f"model.task: {missing}")
        strides = tuple(FIRST_STRIDE * prediction[0].shape[2] / m.shape[2] for m in prediction)
        criterion = _criterion(classes_of(prediction, reg_max), reg_max, strides, str(prediction[0].device))
        n, device = len(labels), prediction[0].device
        found = [t.view(-1, 5).float().to(device) for t in labels]
        batch = {"batch_idx": torch.cat([torch.full((len(t),), float(i), device=device) for i, t in enumerate(found)]),
                 "cls": torch.cat([t[:, :1] for t in found]), "bboxes": torch.cat([t[:, 1:] for t in found])}
        flat = torch.cat([m.flatten(2) for m in prediction], 2)
        preds = {"boxes": flat[:, :4 * reg_max], "scores": flat[:, 4 * reg_max:], "feats": prediction}
        total, _ = criterion(preds, batch)
        return total.sum() / n
    return loss


def task(reg_max: int = REG_MAX) -> Task:
    """The YOLO task for heads of `reg_max` DFL bins per box side; no distillation (the maps are not one
    distribution)."""
    return Task("yolo", ("map50_95", "map50"), raw_maps, _loss(reg_max), _statistics(reg_max), score,
                _check(reg_max), distill=False, cannot_train=ultralytics_missing)


YOLO = task()
