"""TensorBoard curves of a run, under OUTPUT/tune (`tensorboard --logdir OUTPUT/tune`): the search's best score so
far and each candidate's score, by candidates evaluated (tune/search/curves), and each finalist's fine-tuning
metrics per epoch (Tune's own TBXLoggerCallback, in the finalist's trial folder of tune/finetune).

tensorboardX comes with ray[tune]; without it a run writes no curves and says nothing.
"""
from __future__ import annotations

import importlib.util
import os

from ray.tune import Callback

from .rundir import RunDir
from .store import CandidateStore

SEARCH_CURVES = "curves"  # in the search's Tune experiment folder


def _have_tensorboardx() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


class SearchCurves(Callback):
    """Writes `search/best_score` (the best score so far) and `search/score` (each candidate's) against the number
    of candidates evaluated (failed ones count, unscored), starting from what a resumed run's store holds."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.writer = None

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts: the curves begin with what the store holds."""
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(RunDir(self.output_dir).tune_path, "search", SEARCH_CURVES),
                                    flush_secs=5)
        self.seen, self.best = set(), None
        for record in sorted(CandidateStore(self.output_dir).records(), key=lambda r: r.finished_at or 0.0):
            self._add(record.index, record.score if record.ok else None)

    def _add(self, index: int, score: float | None) -> None:
        self.seen.add(index)
        if score is None:
            return
        self.best = score if self.best is None else max(self.best, score)
        self.writer.add_scalar("search/score", score, len(self.seen))
        self.writer.add_scalar("search/best_score", self.best, len(self.seen))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        index = result.get("index")
        if index is not None and index not in self.seen and "score" in result:
            self._add(index, result["score"] if result.get("status") == "ok" else None)

    def on_experiment_end(self, trials, **info) -> None:
        self.close()

    def close(self) -> None:
        """Write out what is buffered (also after a Ctrl-C, which skips Tune's end hooks)."""
        if self.writer is not None:
            self.writer.close()


def search_callbacks(output_dir: str) -> list:
    """The search stage's TensorBoard callbacks (none without tensorboardX)."""
    return [SearchCurves(output_dir)] if _have_tensorboardx() else []


def finetune_callbacks() -> list:
    """The fine-tuning stage's TensorBoard callbacks: Tune's own logger, one events file per finalist (none
    without tensorboardX)."""
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()] if _have_tensorboardx() else []
