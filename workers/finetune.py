"""Fine-tune (or train) a network: SGD + nesterov, cosine schedule with warm-up, resumable every epoch."""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataBundle, iterate_batches
from .files import atomic_write
from .scoring import score

EpochCallback = Callable[[int, dict, str | None], None]
CHECKPOINT_NAME = "finetune.pt"  # the checkpoint file finetune() writes (inside a Tune checkpoint directory too)


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_finetuned(path: str) -> dict:
    """The model state dict from a fine-tuning checkpoint file (or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def finetune(model: nn.Module, data: DataBundle, cfg, device: str | torch.device = "cpu",
             checkpoint_path: str | None = None, teacher: nn.Module | None = None,
             on_epoch: EpochCallback | None = None, epochs: int | None = None,
             train_indices=None, val_indices=None, log=None, after_backward: Callable[[], None] | None = None
             ) -> dict:
    """Train `model` on the training split, test every epoch, checkpoint every epoch; resumes from the checkpoint.

    cfg is a FinetuneConfig (epochs, batch_size, lr, momentum, nesterov, weight_decay, warmup_epochs,
    label_smoothing, distill_weight, distill_temperature, seed). `train_indices` limits training to part of
    the training split; `val_indices` (e.g. the held-out split) adds val_accuracy/val_loss to each epoch;
    `after_backward()` runs after every backward pass (sparsity training adds its L1 subgradients there).
    `on_epoch(epoch, metrics, checkpoint_path)` runs after each epoch's checkpoint is written (Tune reports
    from there; raising stops the run). Returns the last epoch's metrics plus the per-epoch history.
    """
    log = log or sys.stderr
    device = torch.device(device)
    epochs = cfg.epochs if epochs is None else epochs
    model.to(device)
    pool = torch.arange(len(data.train_augmented)) if train_indices is None else torch.as_tensor(train_indices)
    n = len(pool)
    steps_per_epoch = max(1, n // cfg.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
    start, history = 0, []
    torch.manual_seed(cfg.seed)
    if checkpoint_path and os.path.isfile(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and "cuda_rng" in state:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, history = state["epoch"] + 1, state["history"]
        print(f"fine-tune: resumed after epoch {start} of {epochs}", file=log)
    if teacher is not None:
        teacher.to(device).eval()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
        order = pool[order[: steps_per_epoch * cfg.batch_size]]
        loss_sum, seen = 0.0, 0
        for x, y in iterate_batches(data.train_augmented, order, cfg.batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            if teacher is not None and cfg.distill_weight > 0:
                with torch.no_grad():
                    target = teacher(x)
                loss = (1 - cfg.distill_weight) * loss + \
                    cfg.distill_weight * _distill_loss(logits, target, cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                   **_evaluate(model, data, val_indices, device), "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": time.perf_counter() - t0}
        history.append(metrics)
        print(f"fine-tune: epoch {epoch + 1}/{epochs} train_loss {metrics['train_loss']:.4f} "
              f"test_acc {metrics['test_accuracy']:.4f} ({metrics['epoch_seconds']:.1f}s)", file=log)
        if checkpoint_path:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                     "rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp), durable=True)
        if on_epoch is not None:
            on_epoch(epoch, metrics, checkpoint_path)
    if not history:
        history.append({"epoch": 0, **_evaluate(model, data, val_indices, device)})
    return {**history[-1], "history": history}


def _evaluate(model: nn.Module, data: DataBundle, val_indices, device: torch.device) -> dict:
    """Test-split metrics, plus validation metrics on `val_indices` of the training split if given."""
    def on(dataset, indices):
        return score(model, ((x.to(device), y.to(device)) for x, y in iterate_batches(dataset, indices, 500)))

    test = on(data.test, range(len(data.test)))
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
    if val_indices is not None:
        val = on(data.train, val_indices)
        metrics.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
    return metrics
