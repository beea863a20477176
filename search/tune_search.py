"""The Ray Tune pieces of the search: strategy Searcher, top-k scheduler, results callback, failure stopper."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import deque

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from prunetune.workers.files import write_json
from prunetune.workers.record import CandidateRecord, best
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
    missing and each candidate is stored once. The candidates a trial had not reported when it died (its node
    lost, its worker killed past Tune's retries) are handed out once more when `retry_lost`; those of a trial
    stopped because a candidate hung (`time_out`) are handed out again in any case, since they never ran; the
    search is finished only when no trial is left running.
    """

    def __init__(self, algorithm: SearchAlgorithm, name: str, baselines: list[tuple[str, list[float]]],
                 num_candidates: int, store: CandidateStore, batch_size: int = 1, concurrency: int = 1,
                 retry_lost: bool = True, metric: str = "score", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.algorithm, self.name, self.baselines = algorithm, name, baselines
        self.num_candidates, self.store, self.retry_lost = num_candidates, store, retry_lost
        self.batch_size, self.concurrency = batch_size, concurrency
        self.next_index = 0
        self._stored: set[int] | None = None
        self._running: dict[str, list[dict]] = {}  # trial id -> the candidates it evaluates
        self._reported: dict[str, set[int]] = {}  # trial id -> the candidates it has reported
        self._again: list[dict] = []  # candidates of trials lost before they reported them, to hand out once more
        self._retried: set[int] = set()
        self._timed_out: set[str] = set()  # trials stopped because a candidate hung

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the strategy space is ours; Tune's param_space stays empty

    def _done(self) -> set[int]:
        if self._stored is None:
            records = self.store.records()
            for record in records:
                self.algorithm.observe(record)
            self._stored = {r.index for r in records}
        return self._stored

    def _candidate(self, index: int, horizon: int) -> dict:
        if index < len(self.baselines):
            source, ratios = self.baselines[index]
        else:
            source, ratios = self.name, self.algorithm.propose(index, horizon)
        return {"index": index, "ratios": ratios, "source": source}

    def _next_batch(self) -> list[dict]:
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
        if not batch:  # every candidate handed out: wait while a running trial may still be lost and hand some out
            return None if self._running else Searcher.FINISHED
        self._running[trial_id], self._reported[trial_id] = batch, set()
        return {"candidates": batch}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if "index" in result and "status" in result and not self.timed_out(trial_id):
            self.algorithm.observe(CandidateRecord.from_dict(result))
            self._reported.setdefault(trial_id, set()).add(result["index"])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        batch, reported = self._running.pop(trial_id, []), self._reported.pop(trial_id, set())
        if self.timed_out(trial_id):  # the rest of its batch never ran: all of it is handed out again
            self._again += [c for c in batch if c["index"] not in reported]
        elif error and self.retry_lost:
            lost = [c for c in batch if c["index"] not in reported and c["index"] not in self._retried]
            self._retried.update(c["index"] for c in lost)
            self._again += lost

    def time_out(self, trial_id: str) -> dict | None:
        """A running trial hangs: the candidate it is on (the first of its batch it has not reported), which the
        caller stores as failed, or None if it reported them all. The trial's later results are ignored, and the
        rest of its batch is handed out again when it ends."""
        self._timed_out.add(trial_id)
        reported = self._reported.setdefault(trial_id, set())
        hung = next((c for c in self._running.get(trial_id, []) if c["index"] not in reported), None)
        if hung is not None:
            reported.add(hung["index"])
        return hung

    def timed_out(self, trial_id: str) -> bool:
        """True for a trial stopped because a candidate hung."""
        return trial_id in self._timed_out

    def handing_out_again(self, index: int) -> bool:
        """True while a lost candidate waits for its new trial (its trial's error is then not its result)."""
        return any(c["index"] == index for c in self._again)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the results store is the search's state (Tune's search experiment is never restored)."""


def leaderboard_path(output_dir: str) -> str:
    """Where the top-k scheduler persists its leaderboard."""
    return os.path.join(output_dir, "leaderboard.json")


class TopKScheduler(FIFOScheduler):
    """Runs trials first-in first-out, sees every result, and keeps the k best candidates by score.

    The leaderboard is written to OUTPUT/leaderboard.json whenever it changes (atomically) and read back
    when a restored experiment first uses the scheduler, so it survives the driver.
    """

    def __init__(self, k: int, output_dir: str):
        super().__init__()
        self.k, self.output_dir = k, output_dir
        self.board: list[CandidateRecord] | None = None

    def _load(self) -> list[CandidateRecord]:
        if self.board is None:
            path = leaderboard_path(self.output_dir)
            rows = json.load(open(path)) if os.path.isfile(path) else []
            self.board = [CandidateRecord.from_dict(row) for row in rows]
        return self.board

    def offer(self, result: dict) -> bool:
        """Consider one candidate result; True if it entered the top k."""
        if "index" not in result or "status" not in result:
            return False
        record = CandidateRecord.from_dict(result)
        if not record.ok:
            return False
        board = best([r for r in self._load() if r.index != record.index] + [record], self.k)
        changed = [r.index for r in board] != [r.index for r in self._load()]
        self.board = board
        if changed:
            write_json(leaderboard_path(self.output_dir), [r.to_dict() for r in board])
        return changed

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self.offer(result)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result:
            self.offer(result)

    def debug_string(self) -> str:
        return f"TopKScheduler: {len(self._load())}/{self.k} kept"


class StoreCallback(Callback):
    """Writes every finished candidate (and every errored trial the searcher does not hand out again) to the
    Parquet store, in groups; prints progress.

    Group commit: records received are buffered and written as one part file (one fsync) per group. A group is
    committed as soon as it holds `group_size` records, or when `interval_s` has passed since the last commit
    (so a slow search commits each record at once, and a fast one at most one time-closed group per interval);
    the bound is checked on every result, every trial end and error, and on Tune's every loop step
    (`on_step_end`), so a quiet period still commits. `flush()` commits the rest: Tune calls it at the end of the
    experiment (`on_experiment_end`, also when the loop raises an exception) and `stages.run_search` calls it in
    a `finally`, since a Ctrl-C (KeyboardInterrupt out of Tune's loop) skips Tune's end hooks.

    Loss bound: a SIGKILL of the driver loses the candidates in flight plus those received but not committed:
    fewer than `group_size`, all received since the last commit, so within the last `interval_s` (plus at most
    one Tune loop step). Ctrl-C and a normal end lose only what is in flight. A resume evaluates the lost ones.

    Each commit adds the new part's checksum (of the bytes written) to the run manifest's part list, kept in
    memory (seeded once from the manifest at the first commit), so no earlier part is re-read or re-hashed: a
    commit costs one part write and one manifest rewrite, whose size is ~90 bytes per part. Parts number at most
    one per `interval_s` plus one per `group_size` records (the search compacts them into one at its end). The
    progress line comes from counters and is printed at most once per `interval_s`, and at the end.
    """

    def __init__(self, output_dir: str, total: int, searcher: StrategySearcher | None, group_size: int = 64,
                 interval_s: float = 1.0, clock=time.monotonic):
        self.output_dir, self.total, self.searcher = output_dir, total, searcher
        self.group_size, self.interval_s, self.clock = group_size, interval_s, clock
        self.setup()

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts."""
        self.store: CandidateStore | None = None
        self.started = self.clock()
        self.new = 0  # candidates this experiment committed
        self.count = 0  # candidates in the store (counted once when the store is first used, then kept)
        self.best: float | None = None
        self.pending: list[CandidateRecord] = []  # received, not committed yet
        self.parts: dict[str, str] | None = None  # the manifest's part checksums, seeded at the first commit
        self.committed_at = self.printed_at = float("-inf")
        self.shown: tuple | None = None  # (count, best) of the last progress line

    def _store(self) -> CandidateStore:
        if self.store is None:
            self.store = CandidateStore(self.output_dir)
            scores = [r.score for r in self.store.records() if r.ok]  # what a resumed run already holds
            self.best = max(scores) if scores else None
            self.count = len(self.store.indices())
        return self.store

    def _record(self, record: CandidateRecord) -> None:
        """Buffer one record; commit the group if it is full or the interval has passed."""
        self._store()
        record.finished_at = time.time()
        self.pending.append(record)
        if record.ok:
            self.best = record.score if self.best is None else max(self.best, record.score)
        self._tick()

    def _tick(self) -> None:
        """Commit the buffer if it holds a group or the last commit is `interval_s` old; print progress at most
        once per `interval_s`."""
        now = self.clock()
        if self.pending and (len(self.pending) >= self.group_size or now - self.committed_at >= self.interval_s):
            self._commit(now)
        if now - self.printed_at >= self.interval_s:
            self._progress(now)

    def _commit(self, now: float) -> None:
        written = self._store().write_part(self.pending)  # the buffer is kept if the write raises
        self.pending, self.committed_at = [], now
        if written is None:
            return
        path, digest, rows = written
        run = RunDir(self.output_dir)  # the manifest keeps a checksum per part for resume to verify
        if self.parts is None:
            listed = run.manifest().get("candidates", {}).get("parts", {})
            self.parts = {name: d for name, d in listed.items() if os.path.isfile(os.path.join(self.store.path, name))}
        self.parts[os.path.basename(path)] = digest
        self.count, self.new = self.count + rows, self.new + rows
        run.update(candidates={"rows": self.count, "parts": self.parts})

    def _progress(self, now: float) -> None:
        if self.store is None or (self.count, self.best) == self.shown:
            return
        self.shown, self.printed_at = (self.count, self.best), now
        rate = self.new / max(now - self.started, 1e-9) * 60
        best_score = "n/a" if self.best is None else f"{self.best:.4f}"
        print(f"[search] candidates {self.count}/{self.total} | best score {best_score} | "
              f"{rate:.1f} candidates/min", file=sys.stdout, flush=True)

    def flush(self) -> None:
        """Commit every record received and print the progress line (the end of the search, or an interrupt)."""
        now = self.clock()
        if self.pending:
            self._commit(now)
        self._progress(now)

    def on_step_end(self, iteration, trials, **info) -> None:
        self._tick()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._tick()

    def on_experiment_end(self, trials, **info) -> None:
        self.flush()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        timed_out = self.searcher is not None and self.searcher.timed_out(trial.trial_id)
        if "index" in result and "status" in result and not timed_out:
            record = CandidateRecord.from_dict(result)
            record.trial_id = trial.trial_id
            self._record(record)

    def time_out(self, trial, limit_s: float, key: str) -> CandidateRecord | None:
        """A trial has reported nothing for `limit_s`: store the candidate it hangs on as failed (its trial is
        then stopped and the rest of its batch handed out again); that record, or None if it had no candidate left."""
        candidate = self.searcher.time_out(trial.trial_id)
        if candidate is None:
            return None
        message = f"timed out after {seconds(limit_s)} s"
        record = CandidateRecord.failed(candidate["index"], candidate["ratios"], message)
        record.trial_id, record.source = trial.trial_id, candidate["source"]
        self._record(record)
        print(f"[search] candidate {record.index}: {record.error} ({key}); stored as failed, its worker is replaced",
              file=sys.stdout, flush=True)
        return record

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        """The candidates of the errored trial's batch it had not reported (neither stored nor waiting to be):
        handed out again by the searcher, or stored as failed with the trial's error. A trial stopped because a
        candidate hung leaves nothing to store: that candidate is stored, the rest is handed out again."""
        if self.searcher.timed_out(trial.trial_id):
            return
        message = "trial errored"
        if trial.error_file and os.path.isfile(trial.error_file):
            lines = [ln for ln in open(trial.error_file).read().strip().splitlines() if ln.strip()]
            message = lines[-1] if lines else message
        received = self._store().indices() | {r.index for r in self.pending}
        for candidate in trial.config.get("candidates", []):
            index = candidate["index"]
            if index in received:
                continue
            if self.searcher.handing_out_again(index):  # Tune tells the searcher first, then its callbacks
                print(f"[search] candidate {index}: its trial was lost ({_brief(message)}); evaluating it again",
                      file=sys.stdout, flush=True)
                continue
            record = CandidateRecord.failed(index, candidate["ratios"], message)
            record.trial_id, record.source = trial.trial_id, candidate["source"]
            self._record(record)


def _brief(message: str, limit: int = 160) -> str:
    """A Ray error's first sentence, at most `limit` characters: what a progress line shows of it."""
    first = message.split(". ", 1)[0].rstrip(".")
    return first if len(first) <= limit else first[:limit - 3] + "..."


class FailureStopper(Stopper):
    """Stops the whole search when too many candidates fail (after a minimum number of results)."""

    def __init__(self, max_failed_fraction: float, minimum: int):
        self.max_failed_fraction, self.minimum = max_failed_fraction, minimum
        self.status: dict[int, str] = {}  # candidate -> ok | failed (Tune may show a result more than once)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("status") in ("ok", "failed") and "index" in result:
            self.status[result["index"]] = result["status"]
        return False

    def stop_all(self) -> bool:
        failed = sum(s == "failed" for s in self.status.values())
        return len(self.status) >= self.minimum and failed / len(self.status) > self.max_failed_fraction


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


class CandidateTimeouts(Timeouts):
    """search.candidate_timeout_s: the candidate a hung trial is on is stored as failed (`timed out after N s`),
    its worker is replaced, and the rest of its batch is handed out again. The failure counts for the
    FailureStopper, so a search whose every candidate hangs (a dead GPU) stops like one whose candidates fail."""

    def __init__(self, fixed_s: float | None, store: StoreCallback, stopper: FailureStopper, **kwargs):
        super().__init__("search.candidate_timeout_s", fixed_s, **kwargs)
        self.store, self.stopper = store, stopper

    def on_timeout(self, trial, limit_s: float) -> None:
        record = self.store.time_out(trial, limit_s, self.key)
        if record is not None:
            self.stopper(trial.trial_id, record.to_dict())


class EpochTimeouts(Timeouts):
    """finetune.epoch_timeout_s: a finalist whose epoch runs longer is stopped (its last finished epoch is its
    model) and said so; the others go on."""

    def __init__(self, fixed_s: float | None, **kwargs):
        super().__init__("finetune.epoch_timeout_s", fixed_s, **kwargs)

    def on_timeout(self, trial, limit_s: float) -> None:
        epoch = (trial.last_result or {}).get("epoch")
        kept = f"its epoch {epoch} model is kept" if epoch else "it has no finished epoch"
        print(f"[finetune] finalist {trial.config.get('rank')}: no epoch finished within {seconds(limit_s)} s "
              f"({self.key}); stopped, {kept}", file=sys.stdout, flush=True)


class FinetuneProgress(Callback):
    """Prints one line per fine-tuning epoch of every finalist (its validation and test `metric`)."""

    def __init__(self, metric: str = "accuracy"):
        self.metric = metric

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" in result and "rank" in result:
            metric, short = self.metric, short_name(self.metric)
            print(f"[finetune] finalist {result['rank']} (candidate {result['index']}) epoch {result['epoch']}: "
                  f"val {short} {result.get(f'val_{metric}', float('nan')):.4f}, "
                  f"test {short} {result.get(f'test_{metric}', float('nan')):.4f}", file=sys.stdout, flush=True)
