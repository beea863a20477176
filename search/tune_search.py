"""The Ray Tune pieces of a run: the search's strategy Searcher, the timeouts of hung trials, fine-tuning progress."""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

from ray.tune import Callback
from ray.tune.search import Searcher

from prunetune.workers.logs import RUN
from prunetune.workers.record import Candidate, CandidateRecord
from prunetune.workers.tasks import short_name

from .algorithms import SearchAlgorithm
from .rundir import RunDir
from .store import CandidateStore


class StrategySearcher(Searcher):
    """Numbers the candidates and asks a search algorithm for each one's strategy (Tune's side of `algorithms`).

    A trial evaluates a batch of consecutive candidates (`batch_size`; fewer at the end of the search, spread
    over the `concurrency` slots), so Tune's per-trial cost is paid once per batch, and reports each candidate as
    it finishes. Batches are aligned to multiples of batch_size, and the algorithm proposes a batch's candidates
    from the records before its first number, so a resumed serial search proposes what it would have. The
    baselines are candidates 0, 1, ...; the algorithm proposes the rest. The results store is the search's state:
    before the first suggestion every stored record is replayed through the algorithm's `observe`, and candidates
    already stored are never handed out again, so a resumed search evaluates exactly the candidates that are
    missing and each candidate is stored once.

    The searcher keeps proposal state only: what it handed out to which trial, and what to hand out again. The
    ledger (ledger.py), which hears every result, tells it what was received (`observe`) and when a trial ended
    (`trial_ended`); Tune's own notices to the searcher are not used, so nothing depends on the order in which Tune
    tells its searcher and its callbacks. The search is finished only when no trial is left running.
    """

    def __init__(self, algorithm: SearchAlgorithm, name: str, baselines: list[tuple[str, list[float]]],
                 num_candidates: int, store: CandidateStore, batch_size: int = 1, concurrency: int = 1,
                 retry_lost: bool = True, metric: str = "score", mode: str = "max",
                 latency_budget: Callable[[list[float]], float | None] = lambda ratios: None):
        super().__init__(metric=metric, mode=mode)
        self.algorithm, self.name, self.baselines = algorithm, name, baselines
        self.num_candidates, self.store, self.retry_lost = num_candidates, store, retry_lost
        self.batch_size, self.concurrency, self.latency_budget = batch_size, concurrency, latency_budget
        self.next_index = 0
        self._stored: set[int] | None = None
        self._running: dict[str, list[Candidate]] = {}  # trial id -> the candidates it evaluates
        self._again: list[Candidate] = []  # candidates of ended trials, to hand out once more
        self._retried: set[int] = set()  # candidates handed out again because their trial was lost

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the strategy space is ours; Tune's param_space stays empty

    def _done(self) -> set[int]:
        if self._stored is None:
            records = self.store.records()
            for record in records:
                self.algorithm.observe(record)
            self._stored = {r.index for r in records}
        return self._stored

    def _candidate(self, index: int, horizon: int) -> Candidate:
        if index < len(self.baselines):
            source, ratios = self.baselines[index]
        else:
            source, ratios = self.name, self.algorithm.propose(index, horizon)
        return Candidate(index, tuple(float(r) for r in ratios), source, self.latency_budget(ratios))

    def _next_batch(self) -> list[Candidate]:
        """The next candidates to hand out: those of the current aligned batch not stored yet, at most this slot's
        share of what is left."""
        done = self._done()
        while self.next_index < self.num_candidates:
            horizon = self.next_index // self.batch_size * self.batch_size
            share = -(-(self.num_candidates - self.next_index) // self.concurrency)
            stop = min(horizon + self.batch_size, self.num_candidates, self.next_index + share)
            indices = [i for i in range(self.next_index, stop) if i not in done]
            self.next_index = stop
            if indices:
                return [self._candidate(i, horizon) for i in indices]
        return []

    def suggest(self, trial_id: str):
        if self._again:
            batch, self._again = self._again[:self.batch_size], self._again[self.batch_size:]
        else:
            batch = self._next_batch()
        if not batch:  # every candidate handed out: wait while a running trial may still end and hand some out
            return None if self._running else Searcher.FINISHED
        self._running[trial_id] = batch
        return {"candidates": batch}

    def observe(self, record: CandidateRecord) -> None:
        """A candidate's record, as the ledger received it: the algorithm learns from it."""
        self._done()
        self.algorithm.observe(record)

    def trial_ended(self, trial_id: str, unreported: list[Candidate], hung: bool = False) -> list[Candidate]:
        """Trial `trial_id` ended with `unreported` candidates neither stored nor waiting to be. A trial stopped
        because a candidate hung never ran them: all are handed out again. A lost trial (its worker died past
        Tune's retries) has each handed out once more when `retry_lost`. Returns those not handed out again: their
        result is the trial's error."""
        self._running.pop(trial_id, None)
        again = [c for c in unreported if hung or self.retry_lost and c.index not in self._retried]
        if not hung:
            self._retried.update(c.index for c in again)
        self._again += again
        return [c for c in unreported if c not in again]

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        """Tune's notice is not used: the ledger, which sees the trial's results, calls `trial_ended`."""

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the results store is the search's state (Tune's search experiment is never restored)."""


# The limit of a timeout left to its default: TIMEOUT_FACTOR x the median of the intervals already timed (the last
# TIMED_WINDOW of them), at least TIMEOUT_FLOOR_S; no limit before the first interval is timed.
TIMEOUT_FACTOR, TIMEOUT_FLOOR_S, TIMED_WINDOW = 10, 60.0, 1000


def seconds(value: float) -> str:
    """Seconds as a message shows them: 20, 73.4, 1234.5."""
    return f"{round(value, 1):g}"


def replace_worker(trial) -> None:
    """Kill a hung trial's worker process (a stopped or deadlocked worker answers no graceful stop; Ray kills it
    by force) and let Tune end the trial as errored without retrying it: the next trial gets a fresh worker."""
    import ray

    trial.max_failures = 0  # Tune retries a trial whose worker died while its failures are at most this
    if trial.temporary_state.ray_actor is not None:
        ray.kill(trial.temporary_state.ray_actor, no_restart=True)


class Timeouts(Callback):
    """Stops a trial that reports nothing for longer than a limit, measured on the driver from the trial's last
    result (or its start), checked on every step of Tune's loop (a step waits at most 0.1 s for an event).

    The limit is `fixed_s`, or, when None (the config's `auto`), derived from the intervals between results
    already timed in this experiment: TIMEOUT_FACTOR x their median, at least TIMEOUT_FLOOR_S. `on_timeout` says
    what a timeout means for a stage; then `stop` (replace_worker) kills the trial's worker.
    """

    def __init__(self, key: str, fixed_s: float | None, stop=replace_worker, clock=time.monotonic):
        self.key, self.fixed_s, self.stop, self.clock = key, fixed_s, stop, clock
        self.setup()

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts."""
        self.running: dict[str, tuple] = {}  # trial id -> (the trial, when it last reported or started)
        self.timed: deque = deque(maxlen=TIMED_WINDOW)  # seconds between a trial's results (or start and result)

    def limit(self) -> float | None:
        """The limit in force (seconds), None while it is derived and nothing has been timed yet."""
        if self.fixed_s is not None:
            return self.fixed_s
        return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * statistics.median(self.timed)) if self.timed else None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running[trial.trial_id] = (trial, self.clock())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.trial_id not in self.running:  # a trial already stopped
            return
        now = self.clock()
        self.timed.append(now - self.running[trial.trial_id][1])
        self.running[trial.trial_id] = (trial, now)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.pop(trial.trial_id, None)

    on_trial_error = on_trial_recover = on_trial_complete

    def on_step_end(self, iteration, trials, **info) -> None:
        now = self.clock()
        least = self.fixed_s if self.fixed_s is not None else TIMEOUT_FLOOR_S  # no limit is shorter
        overdue = [(t, since) for t, since in self.running.values() if t.status == "RUNNING" and now - since > least]
        limit = self.limit() if overdue else None  # the median only when a trial may be past it
        if limit is None:
            return
        for trial, since in overdue:
            if now - since > limit:
                del self.running[trial.trial_id]
                self.on_timeout(trial, limit)
                self.stop(trial)

    def on_timeout(self, trial, limit_s: float) -> None:
        """What a timeout means for the stage, before the trial's worker is killed."""
        raise NotImplementedError


class EpochTimeouts(Timeouts):
    """finetune.epoch_timeout_s: a finalist whose epoch runs longer is stopped (its last finished epoch is its
    model) and said so; the others go on.

    The limit is read from the run's manifest (epoch_timeout_s, written by run_finetune) each time the stage starts
    (`setup`): a restored Tune experiment runs the callbacks pickled when it first started, and this way they
    apply the limit its resume was given."""

    def __init__(self, output_dir: str, **kwargs):
        self.output_dir = output_dir
        super().__init__("finetune.epoch_timeout_s", None, **kwargs)

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts: the limit in force is the manifest's."""
        super().setup(**info)
        self.fixed_s = RunDir(self.output_dir).manifest().epoch_timeout_s

    def on_timeout(self, trial, limit_s: float) -> None:
        epoch = (trial.last_result or {}).get("epoch")
        kept = f"its epoch {epoch} model is kept" if epoch else "it has no finished epoch"
        RUN.info(f"[finetune] finalist {trial.config.get('rank')}: no epoch finished within {seconds(limit_s)} s "
                 f"({self.key}); stopped, {kept}")


class FinetuneProgress(Callback):
    """Prints one line per fine-tuning epoch of every finalist (its validation and test `metric`)."""

    def __init__(self, metric: str = "accuracy"):
        self.metric = metric

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" in result and "rank" in result:
            metric, short = self.metric, short_name(self.metric)
            RUN.info(f"[finetune] finalist {result['rank']} (candidate {result['index']}) epoch {result['epoch']}: "
                     f"val {short} {result.get(f'val_{metric}', float('nan')):.4f}, "
                     f"test {short} {result.get(f'test_{metric}', float('nan')):.4f}")
