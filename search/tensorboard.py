"""TensorBoard curves of a run, under OUTPUT/tune (`tensorboard --logdir OUTPUT/tune`): the search's best score so
far and each candidate's score, by candidates evaluated (tune/search/curves, drawn by the search's ledger), and
each finalist's fine-tuning metrics per epoch (Tune's own TBXLoggerCallback, in the finalist's trial folder of
tune/finetune).

tensorboardX comes with ray[tune]; without it a run writes no curves and says nothing.
"""
from __future__ import annotations

import importlib.util
import os

from .rundir import RunDir

SEARCH_CURVES = "curves"  # in the search's Tune experiment folder


def have_tensorboardx() -> bool:
    """True when tensorboardX imports (the curves are drawn only then)."""
    return importlib.util.find_spec("tensorboardX") is not None


class SearchCurves:
    """Writes `search/best_score` (the best score so far) and `search/score` (each candidate's) against the number
    of candidates evaluated (failed ones count, unscored). The ledger (ledger.py) feeds it every candidate it
    receives, timed-out ones included, after what a resumed run's store holds."""

    def __init__(self, output_dir: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(RunDir(output_dir).tune_path, "search", SEARCH_CURVES), flush_secs=5)

    def add(self, evaluated: int, score: float | None, best_score: float | None) -> None:
        """The `evaluated`-th candidate: its score (None for a failed one) and the best so far."""
        if score is None:
            return
        self.writer.add_scalar("search/score", score, evaluated)
        self.writer.add_scalar("search/best_score", best_score, evaluated)

    def close(self) -> None:
        """Write out what is buffered."""
        self.writer.close()


def finetune_callbacks() -> list:
    """The fine-tuning stage's TensorBoard callbacks: Tune's own logger, one events file per finalist (none
    without tensorboardX)."""
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()] if have_tensorboardx() else []
