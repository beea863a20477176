"""What a network is for: its loss, its held-out metric and which of its outputs to use (config `model.task`).

A Task is a frozen dataclass of plain functions. The prediction is a tensor or a list of tensors (a detector's
per-scale maps). `statistics(prediction, target)` returns a 1-D float64 tensor that sums over batches (counts
exactly, float sums such as the loss's up to rounding), and `score(summed)` turns the sum into the task's figures,
the primary metric first and `loss` (the mean held-out loss) among them where the task has one. Built in:
classification (accuracy, loss), segmentation (mIoU, pixel accuracy, loss: cross-entropy over pixels whose target
is not `IGNORE_INDEX`) and yolo (workers/yolo.py: mAP@0.5:0.95, mAP@0.5); anything else is
`package.module:function`, a function of no arguments returning a Task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import BadInput

IGNORE_INDEX = 255  # segmentation: target pixels of this value count nowhere (borders, "void")


@dataclass(frozen=True)
class Task:
    """The loss, the held-out metric and the output selection of one kind of network."""

    name: str
    metrics: tuple[str, ...]  # what score() returns, the primary metric first (and "loss")
    select: Callable[[Any], Any]  # the model's output (tensor, tuple, list or dict) -> the prediction (a tensor or
    # a list of tensors)
    loss: Callable[[Any, Any], torch.Tensor]  # (prediction, target batch) -> scalar training loss
    statistics: Callable[[Any, Any], torch.Tensor]  # (prediction, target batch) -> 1-D, summable
    score: Callable[[torch.Tensor], dict]  # summed statistics -> {primary: value, ..., "loss": value}
    # (prediction, the data's class count) -> why the prediction does not fit them, one sentence (None: it fits)
    check: Callable[[Any, int], str | None] = lambda prediction, num_classes: None
    higher_is_better: bool = True  # of the primary metric
    distill: bool = True  # fine-tuning may distil the base's predictions (softened over dim 1, per position)
    cannot_train: Callable[[], str | None] = lambda: None  # why `loss` cannot run here, one sentence (None: it can)

    @property
    def metric(self) -> str:
        """The primary metric's name."""
        return self.metrics[0]


def short_name(metric: str) -> str:
    """A metric's name in progress lines (accuracy: acc, as the lines always said)."""
    return "acc" if metric == "accuracy" else metric


def first_output(output: Any) -> torch.Tensor:
    """The main output of a model: the tensor itself, the first of a tuple or list ((logits, aux)), or `out` of a
    dict (torchvision's segmenters; else its first value)."""
    if isinstance(output, dict):
        return output["out"] if "out" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return first_output(output[0])
    return output


def output_tensors(output: object) -> list[torch.Tensor]:
    """Every tensor in a model's output (nested tuples, lists, dicts), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for v in values for t in output_tensors(v)]


def as_float(prediction: Any) -> Any:
    """A prediction (a tensor, or a list or tuple of them) in float32."""
    if isinstance(prediction, (list, tuple)):
        return [as_float(p) for p in prediction]
    return prediction.float()


_HINT = "; give the factory a num_classes argument (or set it in model.kwargs)"


def _classification_statistics(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.stack([(logits.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                              device=logits.device),
                        F.cross_entropy(logits, y, reduction="sum").double()]).cpu()


def _classification_score(s: torch.Tensor) -> dict:
    correct, n, loss_sum = s.tolist()
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _classification_check(logits: torch.Tensor, num_classes: int) -> str | None:
    if logits.dim() != 2:
        return f"the forward pass must return logits of shape [batch, classes], got {tuple(logits.shape)}"
    if logits.shape[1] != num_classes:
        return f"the model returns {logits.shape[1]} outputs but the data has {num_classes} classes{_HINT}"
    return None


CLASSIFICATION = Task("classification", ("accuracy", "loss"), first_output,
                      lambda logits, y: F.cross_entropy(logits, y), _classification_statistics,
                      _classification_score, _classification_check)


def segmentation_statistics(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = IGNORE_INDEX
                            ) -> torch.Tensor:
    """[loss sum, counted pixels, correct pixels, intersection per class..., union per class...] of logits
    [N, C, H, W] against a mask [N, H, W] (pixels of `ignore_index` left out), float64 on the CPU."""
    logits, mask = logits.float(), mask.long()
    classes = logits.shape[1]
    valid = mask != ignore_index
    predicted, truth = logits.argmax(1)[valid], mask[valid]
    loss = F.cross_entropy(logits, mask, ignore_index=ignore_index, reduction="sum")
    hits = torch.bincount(truth[predicted == truth], minlength=classes)[:classes]
    area = torch.bincount(predicted, minlength=classes)[:classes] + torch.bincount(truth, minlength=classes)[:classes]
    head = torch.stack([loss.detach().double(), valid.sum().double(), (predicted == truth).sum().double()])
    return torch.cat([head, hits.double(), (area - hits).double()]).cpu()


def segmentation_score(s: torch.Tensor) -> dict:
    """mIoU (over the classes present in the prediction or the target), pixel accuracy and mean loss per pixel of
    summed segmentation_statistics."""
    loss_sum, pixels, correct = s[:3].tolist()
    classes = (len(s) - 3) // 2
    intersection, union = s[3:3 + classes], s[3 + classes:]
    present = union > 0
    miou = float((intersection[present] / union[present]).mean()) if present.any() else 0.0
    return {"miou": miou, "pixel_accuracy": correct / max(pixels, 1), "loss": loss_sum / max(pixels, 1)}


def _segmentation_check(logits: torch.Tensor, num_classes: int) -> str | None:
    if logits.dim() != 4:
        return (f"task segmentation needs logits of shape [batch, classes, height, width], got "
                f"{tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        return f"the model returns {logits.shape[1]} classes per pixel but the data has {num_classes} classes{_HINT}"
    return None


SEGMENTATION = Task("segmentation", ("miou", "pixel_accuracy", "loss"), first_output,
                    lambda logits, mask: F.cross_entropy(logits, mask.long(), ignore_index=IGNORE_INDEX),
                    segmentation_statistics, segmentation_score, _segmentation_check)

from .yolo import YOLO  # noqa: E402 (it builds on Task, defined above)

TASKS = {"classification": CLASSIFICATION, "segmentation": SEGMENTATION, "yolo": YOLO}


class TaskError(BadInput, ValueError):
    """A `task` that names no task, or a task function that does not return one."""


def resolve_task(spec: str) -> Task:
    """The built-in task named `spec`, or the Task a `package.module:function` returns (TaskError if neither)."""
    if spec in TASKS:
        return TASKS[spec]
    if ":" not in spec:
        raise TaskError(f"task: unknown task '{spec}'; allowed: {', '.join(TASKS)} or package.module:function")
    from .models import ModelError, resolve_factory

    try:
        task = resolve_factory(spec, "task")()
    except ModelError as e:
        raise TaskError(str(e)) from None
    if not isinstance(task, Task):
        raise TaskError(f"task: {spec}() must return a prunetune.workers.tasks.Task, it returned "
                        f"{type(task).__name__}")
    if "loss" not in task.metrics:
        raise TaskError(f"task: {spec}() returns a Task whose metrics {list(task.metrics)} lack 'loss' (its score "
                        "must give the mean held-out loss too)")
    return task


def search_score(task: Task, figures: dict, metric: str = "accuracy") -> float:
    """What the search maximises of a task's figures: its metric (evaluation.metric `accuracy`, the default; negated
    where lower is better) or, with `loss`, minus the loss (a task whose figures have none is refused by the
    config)."""
    if metric == "loss":
        return -figures["loss"]
    return figures[task.metric] if task.higher_is_better else -figures[task.metric]
