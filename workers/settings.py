"""What the trial side reads of a search's configuration, as plain frozen values: how candidates are scored
(`EvaluationSettings`, the config's `evaluation` section) and how a network is trained (`FinetuneSettings`, the
training keys of its `finetune` section). The driver's config (search/config.py) validates the YAML and hands these
out; a Ray-free user builds them directly. The defaults here are the config's defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluationSettings:
    """How a candidate is scored: the held-out and validation splits, BN recalibration, batches and precision."""

    heldout_size: int = 300  # seeded subset of the training split: ranks the candidates
    validation_size: int | None = None  # the finalists' own split; none: a fifth of the training split (workers/splits)
    seed: int = 0  # held-out and calibration draws
    bn_mode: str = "cumulative"  # cumulative | ema | none
    calibration_batches: int = 50
    calibration_tolerance: float | None = 0.02  # stop once no BatchNorm statistic moves by more than this
    batch_size: int = 128  # calibration batches
    score_batch_size: int = 500
    metric: str = "accuracy"  # accuracy: the task's own metric; loss: minus the held-out loss
    amp: str = "auto"  # auto | bf16 | off (auto: bf16 autocast on CUDA)
    channels_last: str = "auto"  # auto | on | off (auto: on CUDA)


@dataclass(frozen=True)
class FinetuneSettings:
    """A training recipe: SGD with momentum, a cosine schedule after a linear warm-up, optional distillation."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    distill_weight: float = 0.5  # from the teacher (the base); 0: off
    distill_temperature: float = 4.0
    amp: str = "auto"  # auto | bf16 | off (auto: bf16 autocast on CUDA)
    channels_last: str = "auto"  # auto | on | off (auto: on CUDA)
    seed: int = 0
