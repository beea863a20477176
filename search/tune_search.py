"""The Ray Tune pieces of the search: strategy Searcher, top-k scheduler, results callback, failure stopper."""
from __future__ import annotations

import json
import os
import sys
import time

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from prunetune.workers.files import write_json
from prunetune.workers.record import CandidateRecord, best

from .algorithms import SearchAlgorithm
from .rundir import RunDir
from .store import CandidateStore, sha256


class StrategySearcher(Searcher):
    """Numbers the candidates and asks a search algorithm for each one's strategy (Tune's side of `algorithms`).

    The baselines are candidates 0, 1, ...; the algorithm proposes the rest. The results store is the search's
    state: before the first suggestion every stored record is replayed through the algorithm's `observe`, and
    candidates already stored are never handed out again, so a resumed search evaluates exactly the candidates
    that are missing and each candidate is stored once. A trial that dies before it reports (its node lost while
    it started, its worker killed past Tune's retries) hands its candidate out once more when `retry_lost`;
    the search is finished only when no trial is left running.
    """

    def __init__(self, algorithm: SearchAlgorithm, name: str, baselines: list[tuple[str, list[float]]],
                 num_candidates: int, store: CandidateStore, retry_lost: bool = True, metric: str = "score",
                 mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.algorithm, self.name, self.baselines = algorithm, name, baselines
        self.num_candidates, self.store, self.retry_lost = num_candidates, store, retry_lost
        self.next_index = 0
        self._stored: set[int] | None = None
        self._running: dict[str, dict] = {}  # trial id -> the candidate it evaluates
        self._again: list[dict] = []  # candidates of trials lost before they reported, to hand out once more
        self._retried: set[int] = set()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the strategy space is ours; Tune's param_space stays empty

    def _done(self) -> set[int]:
        if self._stored is None:
            records = self.store.records()
            for record in records:
                self.algorithm.observe(record)
            self._stored = {r.index for r in records}
        return self._stored

    def suggest(self, trial_id: str):
        done = self._done()
        while self.next_index < self.num_candidates and self.next_index in done:
            self.next_index += 1
        if self._again:
            config = self._again.pop(0)
        elif self.next_index < self.num_candidates:
            index = self.next_index
            self.next_index += 1
            if index < len(self.baselines):
                source, ratios = self.baselines[index]
            else:
                source, ratios = self.name, self.algorithm.propose(index)
            config = {"index": index, "ratios": ratios, "source": source}
        else:  # every candidate handed out: wait while a running trial may still be lost and handed out again
            return None if self._running else Searcher.FINISHED
        self._running[trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        config = self._running.pop(trial_id, None)
        if result and "index" in result and "status" in result:
            self.algorithm.observe(CandidateRecord.from_dict(result))
        elif error and config and self.retry_lost and config["index"] not in self._retried:
            self._retried.add(config["index"])
            self._again.append(config)

    def handing_out_again(self, index: int) -> bool:
        """True while a lost candidate waits for its new trial (its trial's error is then not its result)."""
        return any(config["index"] == index for config in self._again)

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
    Parquet store; prints progress."""

    def __init__(self, output_dir: str, total: int, searcher: StrategySearcher):
        self.output_dir, self.total, self.searcher = output_dir, total, searcher
        self.setup()

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts."""
        self.store: CandidateStore | None = None
        self.started = time.time()
        self.new = 0
        self.best: float | None = None

    def _store(self) -> CandidateStore:
        if self.store is None:
            self.store = CandidateStore(self.output_dir)
            scores = [r.score for r in self.store.records() if r.ok]  # what a resumed run already holds
            self.best = max(scores) if scores else None
        return self.store

    def _record(self, record: CandidateRecord) -> None:
        store = self._store()
        record.finished_at = time.time()
        part = store.append([record])
        if part:
            self.new += 1
            run = RunDir(self.output_dir)  # the manifest keeps a checksum per part for resume to verify
            known = run.manifest().get("candidates", {"parts": {}})
            known["parts"][os.path.basename(part)] = sha256(part)
            run.update(candidates={"rows": len(store.indices()), "parts": known["parts"]})
        if record.ok:
            self.best = record.score if self.best is None else max(self.best, record.score)
        rate = self.new / max(time.time() - self.started, 1e-9) * 60
        shown = "n/a" if self.best is None else f"{self.best:.4f}"
        print(f"[search] candidates {len(store.indices())}/{self.total} | best score {shown} | "
              f"{rate:.1f} candidates/min", file=sys.stdout, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "index" in result and "status" in result:
            record = CandidateRecord.from_dict(result)
            record.trial_id = trial.trial_id
            self._record(record)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        index = trial.config.get("index")
        if index is None:
            return
        message = "trial errored"
        if trial.error_file and os.path.isfile(trial.error_file):
            lines = [ln for ln in open(trial.error_file).read().strip().splitlines() if ln.strip()]
            message = lines[-1] if lines else message
        if self.searcher.handing_out_again(index):  # Tune tells the searcher first, then its callbacks
            print(f"[search] candidate {index}: its trial was lost ({message}); evaluating it again",
                  file=sys.stdout, flush=True)
            return
        record = CandidateRecord.failed(index, trial.config.get("ratios"), message)
        record.trial_id, record.source = trial.trial_id, trial.config.get("source")
        self._record(record)


class FailureStopper(Stopper):
    """Stops the whole search when too many candidates fail (after a minimum number of results)."""

    def __init__(self, max_failed_fraction: float, minimum: int):
        self.max_failed_fraction, self.minimum = max_failed_fraction, minimum
        self.status: dict[str, str] = {}  # trial id -> ok | failed (Tune may show a result more than once)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("status") in ("ok", "failed"):
            self.status[trial_id] = result["status"]
        return False

    def stop_all(self) -> bool:
        failed = sum(s == "failed" for s in self.status.values())
        return len(self.status) >= self.minimum and failed / len(self.status) > self.max_failed_fraction


class FinetuneProgress(Callback):
    """Prints one line per fine-tuning epoch of every finalist."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" in result and "rank" in result:
            print(f"[finetune] finalist {result['rank']} (candidate {result['index']}) epoch {result['epoch']}: "
                  f"val acc {result.get('val_accuracy', float('nan')):.4f}, "
                  f"test acc {result.get('test_accuracy', float('nan')):.4f}", file=sys.stdout, flush=True)
