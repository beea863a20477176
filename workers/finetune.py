"""Fine-tune (or train) a network: SGD + nesterov, cosine schedule with warm-up, resumable every epoch; when
validating, keeps the best fine-tuned epoch unless epoch 0 is better beyond the validation split's margin
(workers/selection.py); stops on a non-finite loss."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .data import BatchReader, DataBundle, iterate_batches
from .errors import RunFailed
from .files import atomic_write
from .logs import LineStream
from .progress import due, duration
from .scoring import precision, score
from .selection import best_trained, kept_epoch, margin
from .settings import FinetuneSettings
from .tasks import CLASSIFICATION, Task, as_float, short_name

EpochCallback = Callable[[int, dict, str | None], None]
Indices = Sequence[int] | np.ndarray | torch.Tensor  # images of a split, by index
CHECKPOINT_NAME = "finetune.pt"  # the checkpoint file finetune() writes (inside a Tune checkpoint directory too)
BAR_EVERY_S = 0.5  # a terminal's progress line inside an epoch is redrawn at most this often


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_finetuned(path: str) -> dict:
    """The kept model state dict (the kept epoch when validating) from a fine-tuning checkpoint file (or a
    directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("best", state["model"])


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the softened class distributions (over dim 1), per sample and position (pixels, cells)."""
    t, positions = temperature, student[0, 0].numel()
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t / positions


class TrainingDiverged(RunFailed, RuntimeError):
    """A training's loss or weights became non-finite (nan or inf): the weights are useless; nothing is kept."""


def _progress(stage: str, metrics: dict, epochs: int, seconds: list[float], metric: str) -> str:
    """One line per epoch: the stage, epoch i/N, its figures, time per epoch and the time left."""
    per_epoch = sum(seconds) / len(seconds)
    val = f" val_{short_name(metric)} {metrics[f'val_{metric}']:.4f}" if f"val_{metric}" in metrics else ""
    return (f"{stage}: epoch {metrics['epoch']}/{epochs} train_loss {metrics['train_loss']:.4f}{val} "
            f"test_{short_name(metric)} {metrics[f'test_{metric}']:.4f} ({per_epoch:.1f} s/epoch, "
            f"ETA {duration(per_epoch * (epochs - metrics['epoch']))})")


def _columns(terminal) -> int:
    """The width of the terminal `terminal` writes to (80 when it cannot be told: no size, or a size of 0)."""
    try:
        return os.get_terminal_size(terminal.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


class _StepBar:
    """Progress inside an epoch. Where `log` is a terminal: one line redrawn in place (steps, time left in the
    epoch), at most every BAR_EVERY_S, cleared before the epoch's own line; elsewhere a plain line about every
    progress.PROGRESS_EVERY_S (one step early when waiting for the next step would make it late; none in an epoch
    shorter than that)."""

    def __init__(self, log, stage: str, epoch: int, epochs: int, steps: int):
        self.log, self.label, self.steps = log, f"{stage}: epoch {epoch}/{epochs}", steps
        self.on = bool(getattr(log, "isatty", lambda: False)())
        self.width = _columns(log) - 1 if self.on else 0  # a longer line wraps, and \r redraws only its last row
        self.start = self.shown = self.last = time.perf_counter()

    def step(self, k: int) -> None:
        now = time.perf_counter()
        ahead, self.last = (0.0 if self.on else now - self.last), now  # plain lines: the next step's time, foreseen
        if not due(self.shown, now + ahead, BAR_EVERY_S if self.on else None) or (k >= self.steps and not self.on):
            return
        self.shown, filled = now, int(20 * k / self.steps)
        eta = f"(epoch ETA {duration((now - self.start) / k * (self.steps - k))})"
        if not self.on:
            print(f"{self.label} step {k}/{self.steps} {eta}", file=self.log, flush=True)
            return
        line = f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] step {k}/{self.steps} {eta}"
        self.log.write(f"\r{line[:self.width]}\x1b[K")
        self.log.flush()

    def clear(self) -> None:
        if self.on:
            self.log.write("\r\x1b[K")


def _with_best(metrics: dict, history: list[dict], best: int, metric: str) -> dict:
    """Epoch metrics plus the kept epoch so far (selection.kept_epoch; epoch 0 = before any training)."""
    return {**metrics, "best_epoch": history[best]["epoch"], f"best_val_{metric}": history[best][f"val_{metric}"],
            f"best_test_{metric}": history[best][f"test_{metric}"], f"start_val_{metric}": history[0][f"val_{metric}"]}


@dataclass(frozen=True)
class FinetuneOptions:
    """The circumstances of one training beside its recipe: where it runs, on which images, what it resumes from,
    what it learns from and whom it tells."""

    device: str | torch.device = "cpu"
    train_indices: Indices | None = None  # part of the training split (None: all of it)
    val_indices: Indices | None = None  # images of the training split to validate on (None: no validation)
    checkpoint_path: str | None = None  # written every epoch, resumed from when it exists
    teacher: nn.Module | None = None  # distilled from (with the recipe's distill_weight)
    stage: str = "fine-tuning"  # what the progress lines call it
    task: Task = CLASSIFICATION
    num_workers: int = 0  # processes reading training images (datasets not held in memory)
    data_parallel: bool = False  # torch.distributed is initialized: train through DistributedDataParallel
    log: TextIO | None = None  # progress lines (None: the prunetune logger)
    on_epoch: EpochCallback | None = None  # after each epoch's checkpoint
    after_backward: Callable[[], None] | None = None  # after every backward pass


def finetune(model: nn.Module, data: DataBundle, settings: FinetuneSettings,
             options: FinetuneOptions = FinetuneOptions()) -> dict:
    """Train `model` on the training split, test every epoch, checkpoint every epoch; resumes from the checkpoint.

    `settings` is the recipe (epochs, batch size, SGD, schedule, label smoothing, distillation, precision, seed),
    `options` the rest. `options.train_indices` limits training to part of the training split. With
    `options.val_indices` (images of the training split that `model` was not trained on, e.g. the finalists'
    validation split) the model is validated before the first epoch (epoch 0) and after each, and `model` ends with
    the kept epoch's weights: the best fine-tuned epoch, unless epoch 0 is better than it by more than the margin on
    len(val_indices) images (selection.kept_epoch). `after_backward()` runs after every backward pass (sparsity
    training adds its L1 subgradients there). `on_epoch(epoch, metrics, checkpoint_path)` runs after each epoch's
    checkpoint is written (Tune reports from there; raising stops the run). Progress lines name `stage`. With
    `data_parallel` (torch.distributed initialized, as a Ray Train worker's is) the model trains through
    DistributedDataParallel: each process reads its rank's share of every epoch's shuffled order (as
    DistributedSampler does; batch_size stays the global batch) and only rank 0 writes the checkpoint. A non-finite
    loss or weight raises TrainingDiverged. `task` gives the loss, the output to train and the validation metric
    (METRIC in the figures' names val_METRIC, test_METRIC: accuracy by default). Returns the kept epoch's metrics
    (with best_* fields when validating) plus the per-epoch history.
    """
    checkpoint_path, teacher, task, stage = options.checkpoint_path, options.teacher, options.task, options.stage
    train_indices, val_indices, num_workers = options.train_indices, options.val_indices, options.num_workers
    log = options.log or LineStream()
    metric = task.metric
    device = torch.device(options.device)
    epochs = settings.epochs
    autocast, channels_last = precision(settings, device)
    model.to(device)
    if channels_last:  # Module.to takes a memory format too; torch's overloads leave it out
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    pool = torch.arange(len(data.train_augmented)) if train_indices is None else torch.as_tensor(train_indices)
    n = len(pool)
    steps_per_epoch = max(1, n // settings.batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if options.data_parallel else (0, 1)
    batch_size = max(1, settings.batch_size // world)  # per process
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if options.data_parallel else model
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                nesterov=settings.nesterov, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(epochs * steps_per_epoch, int(settings.warmup_epochs * steps_per_epoch)))
    start, history, best = 0, [], 0
    start_state: dict | None = None  # epoch 0's weights, when validating
    trained_state: dict | None = None  # the best fine-tuned epoch's
    torch.manual_seed(settings.seed)
    if checkpoint_path and os.path.isfile(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and "cuda_rng" in state:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, history = state["epoch"] + 1, state["history"]
        best, start_state, trained_state = state.get("best_index", 0), state.get("start"), state.get("trained")
        print(f"{stage}: resumed after epoch {start} of {epochs}", file=log)
    elif val_indices is not None:  # epoch 0: the model as it came, the result to beat
        history = [{"epoch": 0, **_evaluate(model, data, val_indices, device, autocast, num_workers, task)}]
        start_state = _copy_state(model)
        print(f"{stage}: before epoch 1 val_{short_name(metric)} {history[0][f'val_{metric}']:.4f} "
              f"test_{short_name(metric)} {history[0][f'test_{metric}']:.4f}", file=log)
    if teacher is not None:
        teacher.to(device).eval()
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing) if settings.label_smoothing else task.loss
    distill_from = teacher if teacher is not None and settings.distill_weight > 0 and task.distill else None
    reader = BatchReader(data.train_augmented, batch_size, num_workers)
    seconds = []
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 10_007 + epoch))
        order = pool[order[: steps_per_epoch * batch_size * world]][rank::world]
        loss_sum, seen = 0.0, 0
        bar = _StepBar(log, stage, epoch + 1, epochs, steps_per_epoch)
        for step, (x, y) in enumerate(reader(order), 1):
            x, y = x.to(device, non_blocking=True), to_device(y, device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = task.select(net(x))
                loss = criterion(as_float(logits), y)
                if distill_from is not None:
                    with torch.no_grad():
                        target = task.select(distill_from(x)).float()
                    loss = (1 - settings.distill_weight) * loss + \
                        settings.distill_weight * _distill_loss(logits.float(), target, settings.distill_temperature)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"{stage}: the loss became {value} at epoch {epoch + 1}/{epochs}, step {step} "
                                       f"(lr {scheduler.get_last_lr()[0]:.3g}): the training diverged or the data "
                                       "holds non-finite values; nothing of it was kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.after_backward is not None:
                options.after_backward()
            optimizer.step()
            scheduler.step()
            loss_sum += value * len(x)
            seen += len(x)
            bar.step(step)
        bar.clear()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(f"{stage}: the weights became non-finite in epoch {epoch + 1}/{epochs}: the "
                                   "training diverged; nothing of it was kept")
        seconds.append(time.perf_counter() - t0)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                   **_evaluate(model, data, val_indices, device, autocast, num_workers, task),
                   "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": seconds[-1]}
        history.append(metrics)
        if val_indices is not None:
            figures = [h[f"val_{metric}"] for h in history]
            if best_trained(figures, task.higher_is_better) == len(history) - 1:
                trained_state = _copy_state(model)
            best = kept_epoch(figures, metric, len(val_indices), task.higher_is_better)
            metrics = _with_best(metrics, history, best, metric)
        print(_progress(stage, metrics, epochs, seconds, metric), file=log, flush=True)
        if checkpoint_path and rank == 0:
            saved: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                                     "rng": torch.get_rng_state()}
            if start_state is not None:  # torch.save writes the kept state's tensors once
                saved.update(best=trained_state if best else start_state, best_index=best, start=start_state,
                             trained=trained_state)
            if torch.cuda.is_available():
                saved["cuda_rng"] = torch.cuda.get_rng_state_all()
            atomic_write(checkpoint_path, partial(torch.save, saved), durable=True)
        if options.on_epoch is not None:
            options.on_epoch(epoch, metrics, checkpoint_path)
    if start_state is not None and val_indices is not None:
        kept = trained_state if best else start_state
        assert kept is not None  # a fine-tuned epoch is kept only once one was trained
        model.load_state_dict(kept)
        print(_kept_line(stage, history, best, task, len(val_indices)), file=log, flush=True)
        return {**_with_best(history[best], history, best, metric), "history": history}
    if not history:
        history.append({"epoch": 0, **_evaluate(model, data, val_indices, device, autocast, num_workers, task)})
    return {**history[-1], "history": history}


def _kept_line(stage: str, history: list[dict], best: int, task: Task, n: int) -> str:
    """Which epoch a validated fine-tuning keeps, and why; a model left as it came (epoch 0) is flagged."""
    metric = task.metric
    figures, name = [h[f"val_{metric}"] for h in history], f"val_{short_name(metric)}"
    if best == 0 and len(history) > 1:
        trained = best_trained(figures, task.higher_is_better)  # what epoch 0 beat
        return (f"{stage}: kept epoch 0, NOT fine-tuned: {name} {figures[0]:.4f} before fine-tuning beats the best "
                f"fine-tuned epoch {trained} ({figures[trained]:.4f}) by more than the margin "
                f"{margin(metric, figures[0], n):.4f} on {n} validation images")
    last = f"; the last epoch reached {figures[-1]:.4f}" if best != len(history) - 1 else ""
    return f"{stage}: kept epoch {history[best]['epoch']} ({name} {figures[best]:.4f}, epoch 0 {figures[0]:.4f}{last})"


def _copy_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_device(target, device: torch.device):
    """A batch's targets on `device`: a tensor, or each tensor of a list (box lists)."""
    if isinstance(target, torch.Tensor):
        return target.to(device, non_blocking=True)
    return [to_device(t, device) for t in target] if isinstance(target, (list, tuple)) else target


def _evaluate(model: nn.Module, data: DataBundle, val_indices, device: torch.device,
              autocast: torch.dtype | None = None, num_workers: int = 0, task: Task = CLASSIFICATION) -> dict:
    """Test-split figures (test_METRIC for each of the task's), plus validation figures (val_METRIC) on
    `val_indices` of the training split if given."""
    def on(dataset, indices, split):
        batches = iterate_batches(dataset, indices, 500, num_workers)
        found = score(model, ((x.to(device), to_device(y, device)) for x, y in batches), autocast, task)
        return {f"{split}_{name}": found[name] for name in task.metrics}

    metrics = on(data.test, range(len(data.test)), "test")
    if val_indices is not None:
        metrics.update(on(data.train, val_indices, "val"))
    return metrics
