"""What figures measured on a validation split of n images can tell apart: the margin, the kept epoch of a
fine-tuning, and which finalists are tied.

The margin of a figure on n images is what a difference must exceed to count:
- accuracy (a proportion): Z binomial standard errors, Z * sqrt(p(1-p)/n), and never less than one image (1/n);
  e.g. p = 0.99 on 288 images: 1.15 points (3.3 images);
- any other metric (mIoU, mAP, a loss): no binomial error applies, so one image's share of the figure, |value| / n
  (its resolution as a mean over n images): a fine-tuned epoch then loses only to a clearly better epoch 0.
"""
from __future__ import annotations

import math

Z = 1.96  # two-sided 95% normal quantile


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a proportion p measured on n items: sqrt(p(1-p)/n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def margin(metric: str, value: float, n: int) -> float:
    """The smallest difference from `value` (of `metric` on n validation images) that counts (see the module)."""
    if metric == "accuracy":
        return max(1 / n, Z * standard_error(value, n))
    return abs(value) / n


def best_trained(figures: list[float], higher_is_better: bool = True) -> int:
    """The best fine-tuned epoch (the later on a tie) of validation figures listed from epoch 0 (before any
    training); 0 when there is none."""
    sign = 1 if higher_is_better else -1
    return max(range(1, len(figures)), key=lambda i: (sign * figures[i], i), default=0)


def kept_epoch(figures: list[float], metric: str, n: int, higher_is_better: bool = True) -> int:
    """The epoch to keep of a fine-tuning whose validation figures on n images are `figures` (epoch 0 first): the
    best fine-tuned epoch, unless epoch 0 is better than it by more than epoch 0's margin."""
    trained = best_trained(figures, higher_is_better)
    sign = 1 if higher_is_better else -1
    beyond = trained and sign * (figures[0] - figures[trained]) > margin(metric, figures[0], n)
    return 0 if beyond else trained


def tied(a: float, b: float, metric: str, n: int) -> bool:
    """True when figures a and b on the same n validation images differ by no more than the larger one's margin."""
    return abs(a - b) <= margin(metric, max(a, b), n)
