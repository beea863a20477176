"""The search's ledger: the one Tune callback that owns the stream of candidate results.

Every candidate result reaches the ledger (`record_of` turns a Tune result into a CandidateRecord), and the
ledger alone decides what it means: it commits the records to the store in groups, tells the searcher what was
received and what a trial that ended left over, stores a hung candidate as failed, counts the failed fraction
(the `LedgerStopper` asks it), keeps the best score so far, prints the progress line, draws the TensorBoard
curves, and writes OUTPUT/leaderboard.json from what is committed.
"""
from __future__ import annotations

import os
import time

from ray.tune import Callback
from ray.tune.stopper import Stopper

from prunetune.workers.files import write_json
from prunetune.workers import progress
from prunetune.workers.logs import RUN
from prunetune.workers.record import Candidate, CandidateRecord, best

from .rundir import RunDir
from .runfiles import StoredParts
from .store import CandidateStore
from .tensorboard import SearchCurves
from .tune_search import StrategySearcher, Timeouts, replace_worker, seconds

LEADERBOARD = "leaderboard.json"


def leaderboard_path(output_dir: str) -> str:
    """Where the ledger writes the top k of the committed candidates."""
    return os.path.join(output_dir, LEADERBOARD)


def record_of(result: dict, trial_id: str) -> CandidateRecord | None:
    """The candidate record in a search trial's Tune result, None for any other result (Tune's own)."""
    if "index" in result and "status" in result:
        record = CandidateRecord.from_dict(result)
        record.trial_id = trial_id
        return record
    return None


class CandidateTimeouts(Timeouts):
    """search.candidate_timeout_s: the ledger stores the candidate a hung trial is on as failed (`timed out after
    N s`), its worker is replaced, and the rest of its batch is handed out again."""

    def __init__(self, fixed_s: float | None, ledger: Ledger, **kwargs):
        super().__init__("search.candidate_timeout_s", fixed_s, **kwargs)
        self.ledger = ledger

    def on_timeout(self, trial, limit_s: float) -> None:
        self.ledger.time_out(trial, limit_s, self.key)


class Ledger(Callback):
    """Owns the search's results: group commit to the Parquet store, the searcher's view of what was received,
    candidate timeouts, the failed fraction, the best score, progress, curves and leaderboard.

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
    one per `interval_s` plus one per `group_size` records (the search compacts them into one at its end). After
    each commit OUTPUT/leaderboard.json is rewritten (atomically) with the `top_k` best committed candidates, so
    it never names a candidate a kill could lose. The progress line comes from counters and is printed at most
    once per `interval_s`, and at the end; its rate is measured from the first candidate this experiment received
    (Ray's start-up aside), and it shows the time left once the rate is known.

    Each candidate counts once (a result Tune shows again, or a retried trial's, is ignored), and so do the
    results of a trial stopped because a candidate hung. When a trial ends, its candidates neither stored nor
    received are settled with the searcher (`trial_ended`): handed out again, or stored as failed with the
    trial's error; a line on the terminal says which are evaluated again, also when Tune itself retries a trial.
    """

    def __init__(self, output_dir: str, total: int, searcher: StrategySearcher, top_k: int = 1,
                 max_failed_fraction: float = 1.0, minimum: int = 1, timeout_s: float | None = None,
                 curves: bool = False, group_size: int = 64, interval_s: float = 1.0, clock=time.monotonic,
                 stop=replace_worker):
        self.output_dir, self.total, self.searcher, self.top_k = output_dir, total, searcher, top_k
        self.max_failed_fraction, self.minimum, self.curves = max_failed_fraction, minimum, curves
        self.group_size, self.interval_s, self.clock = group_size, interval_s, clock
        self.timeouts = CandidateTimeouts(timeout_s, self, stop=stop, clock=clock)
        self.setup()

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts."""
        self.timeouts.setup(**info)
        self.store: CandidateStore | None = None
        self.received: set[int] = set()  # candidates stored or waiting to be (seeded from the store at first use)
        self.pending: list[CandidateRecord] = []  # received, not committed yet
        self.parts: dict[str, str] | None = None  # the manifest's part checksums, seeded at the first commit
        self.board: list[CandidateRecord] = []  # the top_k committed candidates
        self.best: float | None = None  # the best score received
        self.count = 0  # candidates in the store
        self.new = 0  # candidates this experiment committed
        self.arrived, self.first_at = 0, None  # candidates this experiment received, and when the first came
        self.failed = 0  # of those, failed ones
        self.hung: set[str] = set()  # trials stopped because a candidate hung: their later results are ignored
        self.writer: SearchCurves | None = None
        self.committed_at = self.printed_at = float("-inf")
        self.shown: tuple | None = None  # (count, best) of the last progress line
        self.started = self.waited = self.clock()  # the experiment's start, and the last line while waiting

    def _store(self) -> CandidateStore:
        """The store, opened at the first use: what a resumed run holds seeds the counters, board and curves."""
        if self.store is None:
            self.store = CandidateStore(self.output_dir)
            records = self.store.records()
            self.count, self.board = len(records), best(records, self.top_k)
            self.writer = SearchCurves(self.output_dir) if self.curves else None
            for record in sorted(records, key=lambda r: r.finished_at or 0.0):  # the curves go on from these
                self._note(record)
        return self.store

    def _note(self, record: CandidateRecord) -> None:
        """Count a candidate received (or stored before this experiment): the best score, the curves."""
        self.received.add(record.index)
        if record.ok:
            self.best = record.score if self.best is None else max(self.best, record.score)
        if self.writer is not None:
            self.writer.add(len(self.received), record.score if record.ok else None, self.best)

    def receive(self, record: CandidateRecord) -> None:
        """One candidate's record (a result, a timeout, a trial's error): buffered, once per candidate; the group
        is committed if it is full or the interval has passed."""
        self._store()
        if record.index in self.received:
            return
        record.finished_at = time.time()
        self._note(record)
        self.pending.append(record)
        self.arrived, self.failed = self.arrived + 1, self.failed + (not record.ok)
        if self.first_at is None:
            self.first_at = self.clock()
        self.searcher.observe(record)
        self._tick()

    def _tick(self) -> None:
        """Commit the buffer if it holds a group or the last commit is `interval_s` old; print progress at most
        once per `interval_s`."""
        now = self.clock()
        if self.pending and (len(self.pending) >= self.group_size or now - self.committed_at >= self.interval_s):
            self._commit(now)
        if now - self.printed_at >= self.interval_s:
            self._progress(now)
        if self.first_at is None and progress.due(self.waited, now):  # the trials' start-up: not silent either
            self.waited = now
            RUN.info(f"[search] waiting for the first candidate ({progress.duration(now - self.started)}): the trials "
                     "start and load the model and data")

    def _commit(self, now: float) -> None:
        written = self._store().write_part(self.pending)  # the buffer is kept if the write raises
        committed, self.pending, self.committed_at = self.pending, [], now
        if written is None:
            return
        path, digest, rows = written
        run = RunDir(self.output_dir)  # the manifest keeps a checksum per part for resume to verify
        if self.parts is None:
            stored = run.manifest().candidates
            listed = stored.parts if stored else {}
            self.parts = {name: d for name, d in listed.items() if os.path.isfile(os.path.join(self.store.path, name))}
        self.parts[os.path.basename(path)] = digest
        self.count, self.new = self.count + rows, self.new + rows
        run.update(candidates=StoredParts(rows=self.count, parts=self.parts))
        self.board = best(self.board + committed, self.top_k)
        write_json(leaderboard_path(self.output_dir), [r.to_dict() for r in self.board])

    def rate(self, now: float) -> float | None:
        """Candidates per minute since the first this experiment received; None until a second one came."""
        if self.first_at is None or self.arrived < 2 or now <= self.first_at:
            return None
        return (self.arrived - 1) / (now - self.first_at) * 60

    def _progress(self, now: float) -> None:
        if self.store is None or (self.count, self.best) == self.shown:
            return
        self.shown, self.printed_at = (self.count, self.best), now
        rate = self.rate(now)
        best_score = "n/a" if self.best is None else f"{self.best:.4f}"
        speed = "n/a candidates/min" if rate is None else f"{rate:.1f} candidates/min | ETA " + \
            _duration((self.total - len(self.received)) / rate * 60)
        RUN.info(f"[search] candidates {self.count}/{self.total} | best score {best_score} | {speed}")

    def too_many_failed(self) -> bool:
        """True when more than max_failed_fraction of this experiment's candidates (at least `minimum`) failed."""
        return self.arrived >= self.minimum and self.failed / self.arrived > self.max_failed_fraction

    def flush(self) -> None:
        """Commit every record received and print the progress line (the end of the search, or an interrupt)."""
        now = self.clock()
        if self.pending:
            self._commit(now)
        self._progress(now)
        if self.writer is not None:  # the curves are written out (a Ctrl-C skips Tune's end hooks)
            self.writer.close()
            self.writer = None

    def time_out(self, trial, limit_s: float, key: str) -> None:
        """A trial has reported nothing for `limit_s`: the candidate it hangs on (the first of its batch not
        received) is stored as failed; its later results are ignored, and the rest of its batch is handed out
        again when it ends."""
        self.hung.add(trial.trial_id)
        candidate = next(iter(self._unreported(trial)), None)
        if candidate is None:
            return
        record = candidate.failed(f"timed out after {seconds(limit_s)} s")
        record.trial_id = trial.trial_id
        self.receive(record)
        RUN.info(f"[search] candidate {record.index}: {record.error} ({key}); stored as failed, its worker is "
                 "replaced")

    def _unreported(self, trial) -> list[Candidate]:
        self._store()
        return [c for c in trial.config.get("candidates", []) if c.index not in self.received]

    def _end(self, trial) -> None:
        """Settle an ended trial's candidates not received with the searcher: those it hands out again are said
        so; the rest are stored as failed with the trial's error."""
        unreported = self._unreported(trial)
        failed = self.searcher.trial_ended(trial.trial_id, unreported, hung=trial.trial_id in self.hung)
        if not unreported:
            return
        message = _error_of(trial)
        _say_again([c for c in unreported if c not in failed], message)
        for candidate in failed:
            record = candidate.failed(message)
            record.trial_id = trial.trial_id
            self.receive(record)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.timeouts.on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.timeouts.on_trial_result(iteration, trials, trial, result, **info)
        record = record_of(result, trial.trial_id)
        if record is not None and trial.trial_id not in self.hung:
            self.receive(record)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """Tune retries a trial whose worker died: its candidates not received are evaluated again, and said so."""
        self.timeouts.on_trial_recover(iteration, trials, trial, **info)
        _say_again(self._unreported(trial), _error_of(trial))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.timeouts.on_trial_complete(iteration, trials, trial, **info)
        self._end(trial)
        self._tick()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.timeouts.on_trial_error(iteration, trials, trial, **info)
        self._end(trial)
        self._tick()

    def on_step_end(self, iteration, trials, **info) -> None:
        self.timeouts.on_step_end(iteration, trials, **info)
        self._tick()

    def on_experiment_end(self, trials, **info) -> None:
        self.flush()


class LedgerStopper(Stopper):
    """Stops the whole search when the ledger counts too many failed candidates."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.ledger.too_many_failed()

    def __getstate__(self) -> dict:
        """Tune pickles its stopper into the experiment state every few seconds: the ledger (its records, an open
        curves writer) stays out, since the search's Tune experiment is never restored (the store is its state)."""
        return {}


def _error_of(trial) -> str:
    """The last line of a trial's error file ("trial errored" without one)."""
    if trial.error_file and os.path.isfile(trial.error_file):
        lines = [ln for ln in open(trial.error_file).read().strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "trial errored"
    return "trial errored"


def _say_again(candidates: list[Candidate], message: str) -> None:
    for candidate in candidates:
        RUN.info(f"[search] candidate {candidate.index}: its trial was lost ({_brief(message)}); evaluating it "
                 "again")


def _brief(message: str, limit: int = 160) -> str:
    """A Ray error's first sentence, at most `limit` characters: what a progress line shows of it."""
    first = message.split(". ", 1)[0].rstrip(".")
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _duration(seconds_left: float) -> str:
    """A time left as the progress line shows it: 45 s, 12 min, 3.5 h."""
    if seconds_left < 60:
        return f"{seconds_left:.0f} s"
    if seconds_left < 3600:
        return f"{seconds_left / 60:.0f} min"
    return f"{seconds_left / 3600:.1f} h"
