"""The three disjoint parts of a training split: the search's held-out split (ranks candidates), the finalists'
validation split (judges each finalist's epochs and ranks the finalists) and the rest (BN calibration, fine-tuning
and the base model trained here).

Why a validation split of its own: the finalists are the best scores on the held-out split, so their held-out
figures are the top of many noisy ones (the winner's curse); judged on those same images, a fine-tuned epoch rarely
beats epoch 0. On images that chose nothing, epoch 0's figure is unbiased.

Its default size: VALIDATION_FRACTION of the training split, at most MAX_VALIDATION images. The binomial standard
error of an accuracy p measured on n images is SE = sqrt(p(1-p)/n): on digits (1,438 training images, n = 288) at
p = 0.99 it is 0.59 points (1.7 images); at CIFAR-10's cap n = 5,000, p = 0.90, 0.42 points; at worst (p = 0.5) 0.71
points. More images cost fine-tuning data on a small set and only validation time on a large one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DataError, heldout_split
from .settings import EvaluationSettings

VALIDATION_FRACTION = 0.2  # of the training split, by default
MAX_VALIDATION = 5000  # images, by default: SE <= 0.71 points at any accuracy


@dataclass(frozen=True)
class Splits:
    """Indices into the training split: three disjoint parts that cover it."""

    heldout: np.ndarray  # sorted: the search's held-out split
    validation: np.ndarray  # sorted: the finalists' validation split
    rest: np.ndarray  # seeded order: BN calibration and fine-tuning


def validation_size(n_train: int, heldout_size: int, configured: int | None = None, keep: int = 1) -> int:
    """The validation split's size: `configured`, or VALIDATION_FRACTION of the training split (at most
    MAX_VALIDATION and what the held-out split and `keep` images leave); DataError where it does not fit."""
    room = n_train - heldout_size - keep
    if configured is None:
        if room < 1:
            raise DataError(f"evaluation.heldout_size: must be in [1, {n_train - keep - 1}] for this training set of "
                            f"{n_train} images (at least {keep} stay for calibration and fine-tuning and 1 for the "
                            f"finalists' validation), got {heldout_size}")
        return max(1, min(room, MAX_VALIDATION, round(VALIDATION_FRACTION * n_train)))
    if not 0 < configured <= room:
        raise DataError(f"evaluation.validation_size: must be in [1, {max(room, 1)}] for this training set of "
                        f"{n_train} images with evaluation.heldout_size={heldout_size} (at least {keep} stay for "
                        f"calibration and fine-tuning), got {configured}")
    return configured


def split_training(n_train: int, heldout_size: int, configured_validation: int | None, seed: int,
                   keep: int = 1) -> Splits:
    """The seeded held-out, validation and rest parts of a training split of `n_train` images (the held-out split is
    data.heldout_split's; the validation split is the start of its rest); the rest keeps at least `keep` images."""
    heldout, rest = heldout_split(n_train, heldout_size, seed, keep)
    size = validation_size(n_train, heldout_size, configured_validation, keep)
    return Splits(heldout, np.sort(rest[:size]), rest[size:])


def splits_of(n_train: int, evaluation: EvaluationSettings) -> Splits:
    """split_training with the evaluation settings' sizes and seed; the rest keeps at least one calibration batch."""
    return split_training(n_train, evaluation.heldout_size, evaluation.validation_size, evaluation.seed,
                          evaluation.batch_size)
