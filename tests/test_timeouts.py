"""Hung workers time out (a candidate, a fine-tuning epoch), and a search its time budget ended stays resumable."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from prunetune.search.cli import main
from prunetune.search.config import load_config, resumable
from prunetune.search.rundir import RunDir
from prunetune.search.store import CandidateStore
from prunetune.search.ledger import Ledger, LedgerStopper
from prunetune.search.tune_search import StrategySearcher, Timeouts
from prunetune.workers.record import CandidateRecord
from tests.faults import ROOT, embedded_ray, end_hung_workers
from tests.runs import run_args


def _start(args: list[str], **faults) -> subprocess.Popen:
    """`prunetune ARGS` in its own process group (with its own Ray) whose workers get `faults`."""
    env = {**os.environ, **{f"PRUNETUNE_TEST_{k.upper()}": str(v) for k, v in faults.items()}}
    return subprocess.Popen([sys.executable, "-m", "tests.faults", "0", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _prunetune(args: list[str], **faults) -> tuple[int, str]:
    """`prunetune ARGS` in its own process (and Ray) whose workers get `faults`: its exit code and output. A run
    still going after 10 minutes hangs: it is killed (its Ray with it) and the test fails."""
    proc = _start(args, **faults)
    try:
        out = proc.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"prunetune {args[0]} hangs:\n{proc.communicate()[0][-3000:]}")
    finally:
        end_hung_workers(str(faults["markers"]))
    return proc.returncode, out


class _Watch(Timeouts):
    """Timeouts with a hand-driven clock that lists the trials it timed out and stopped."""

    def __init__(self, fixed_s):
        self.now, self.stopped = 0.0, []
        super().__init__("test.timeout_s", fixed_s, stop=lambda trial: self.stopped.append(trial.trial_id),
                         clock=lambda: self.now)

    def on_timeout(self, trial, limit_s):
        self.stopped.append(f"{trial.trial_id} after {limit_s:g} s")

    def at(self, now, trials):
        self.now = now
        self.on_step_end(0, trials)
        return self.stopped


def _trial(trial_id, status="RUNNING"):
    return SimpleNamespace(trial_id=trial_id, status=status)


def test_a_trial_silent_past_a_fixed_limit_is_stopped_once_and_the_others_go_on():
    watch, a, b, pending = _Watch(5.0), _trial("a"), _trial("b"), _trial("p", "PENDING")
    for trial in (a, b):
        watch.on_trial_start(0, [], trial)
    watch.now = 4.0
    watch.on_trial_result(0, [], b, {})  # b reports: its clock starts again
    assert watch.at(5.0, [a, b, pending]) == []  # 5 s is not past the limit
    assert watch.at(5.5, [a, b, pending]) == ["a after 5 s", "a"]
    assert watch.at(9.5, [a, b, pending]) == ["a after 5 s", "a", "b after 5 s", "b"]  # each stopped once


def test_a_derived_limit_is_ten_times_the_median_interval_and_at_least_a_minute():
    watch, a = _Watch(None), _trial("a")
    watch.on_trial_start(0, [], a)
    assert watch.limit() is None and watch.at(10_000.0, [a]) == []  # nothing timed yet: no limit
    for now in (10_001.0, 10_003.0, 10_006.0):  # intervals 10000, 2 and 3 s: median 3 s
        watch.now = now
        watch.on_trial_result(0, [], a, {})
    assert watch.limit() == 60.0  # 10 x 3 s is below the floor
    for now in (10_026.0, 10_046.0):  # intervals 10000, 2, 3, 20, 20: median 20 s
        watch.now = now
        watch.on_trial_result(0, [], a, {})
    assert watch.limit() == 200.0
    assert watch.at(10_246.0, [a]) == [] and watch.at(10_246.5, [a]) == ["a after 200 s", "a"]


class _Numbered:
    def propose(self, index, horizon=None):
        return [index / 10]

    def observe(self, record):
        pass


def _ledger(tmp_path, total: int, searcher: StrategySearcher, **kwargs) -> Ledger:
    RunDir(str(tmp_path)).create(load_config(None), overwrite=False)
    return Ledger(str(tmp_path), total, searcher, **kwargs)


def test_a_timed_out_trial_gives_its_hung_candidate_and_hands_out_the_rest_of_its_batch_again(tmp_path):
    searcher = StrategySearcher(_Numbered(), "numbered", [], 4, CandidateStore(str(tmp_path)), batch_size=4,
                                retry_lost=False)  # search.max_failures=0: a lost trial's candidates are not retried
    ledger = _ledger(tmp_path, 4, searcher)
    trial = SimpleNamespace(trial_id="a", config=searcher.suggest("a"), error_file=None)
    assert [c.index for c in trial.config["candidates"]] == [0, 1, 2, 3]
    ledger.on_trial_result(0, [], trial, CandidateRecord(0, [0.0], score=0.5, flops=1).to_dict())
    ledger.time_out(trial, 5.0, "search.candidate_timeout_s")  # hung on its second candidate
    ledger.on_trial_result(0, [], trial, CandidateRecord(2, [0.2], score=0.5, flops=1).to_dict())  # late: ignored
    assert searcher.suggest("b") is None  # the hung trial still runs until its worker is gone
    ledger.on_trial_error(0, [], trial)
    ledger.flush()
    stored = [(r.index, r.status, r.error) for r in CandidateStore(str(tmp_path)).records()]
    assert stored == [(0, "ok", None), (1, "failed", "timed out after 5 s")]
    assert [c.index for c in searcher.suggest("b")["candidates"]] == [2, 3]  # handed out again, never stored failed


def test_a_hung_candidate_is_stored_failed_and_counts_as_a_failure_for_stopping_the_search(tmp_path):
    searcher = StrategySearcher(_Numbered(), "numbered", [], 2, CandidateStore(str(tmp_path)), concurrency=2)
    stopped, clock = [], [0.0]
    ledger = _ledger(tmp_path, 2, searcher, max_failed_fraction=0.5, minimum=2, timeout_s=5.0, stop=stopped.append,
                     clock=lambda: clock[0])
    trials = [SimpleNamespace(trial_id=t, status="RUNNING", config=searcher.suggest(t)) for t in "ab"]
    for trial in trials:
        ledger.on_trial_start(0, trials, trial)
    clock[0] = 6.0
    ledger.on_step_end(0, trials)  # both hang: each one's candidate is stored failed, each worker replaced
    ledger.flush()
    records = CandidateStore(str(tmp_path)).records()
    assert [(r.index, r.status, r.error) for r in records] == [(0, "failed", "timed out after 5 s"),
                                                              (1, "failed", "timed out after 5 s")]
    assert stopped == trials and LedgerStopper(ledger).stop_all()  # 2 of 2 failed: the search stops as with failures


def test_the_timeouts_are_auto_by_default_and_may_change_on_resume():
    cfg = load_config(None, ["search.candidate_timeout_s=auto", "finetune.epoch_timeout_s=90"])
    assert cfg.search.candidate_timeout_s is None and cfg.finetune.epoch_timeout_s == 90.0
    assert load_config(None).search.candidate_timeout_s is None
    assert resumable("search.candidate_timeout_s") and resumable("finetune.epoch_timeout_s")


@pytest.mark.ray
@pytest.mark.slow
def test_hung_workers_time_out_in_both_stages_and_a_resume_applies_a_new_epoch_limit(tmp_path):
    # the search: candidates 0-3 run in one trial, 4-7 in the other; that worker stops itself (SIGSTOP) before
    # candidate 2. The driver is killed once a finalist has checkpointed an epoch; the resume restores Tune's
    # fine-tuning experiment (its callbacks as pickled when it started, with no epoch limit) under a 20 s limit given
    # to resume, and the first finalist to finish training epoch 3 stops itself before reporting it.
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "tune" / "finetune"
    proc = _start(run_args(tmp_path, "search.candidate_timeout_s=20", "search.max_concurrent_trials=2", top_k=2,
                           epochs=3), hang_at=2, delay_s=1.0, markers=tmp_path)
    try:
        deadline = time.time() + 400
        while not (checkpoints.is_dir() and any(checkpoints.glob("finalist*/checkpoint_*"))):
            assert time.time() < deadline and proc.poll() is None, "no fine-tuning checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        end_hung_workers(str(tmp_path))
    assert (tmp_path / "hung-2").exists()
    assert "[search] candidate 2: timed out after 20 s (search.candidate_timeout_s)" in out
    records = {r.index: r for r in CandidateStore(str(run)).records()}
    assert sorted(records) == list(range(8))
    assert records[2].status == "failed" and records[2].error == "timed out after 20 s"
    assert all(records[i].ok for i in records if i != 2)  # candidate 3, never started by the hung worker, too

    code, out = _prunetune(["resume", str(run), "--set", "finetune.epoch_timeout_s=20"], hang_epoch=3,
                           markers=tmp_path)
    assert code == 0, out[-3000:]
    assert "[finetune] restoring the Tune experiment" in out and (tmp_path / "hung-epoch-3").exists()
    assert "no epoch finished within 20 s (finetune.epoch_timeout_s); stopped, its epoch 2 model is kept" in out
    summary = json.load(open(run / "final" / "summary.json"))
    assert sorted(final["epochs"] for final in summary["final"]) == [2, 3]  # the other finalist went on
    assert json.load(open(run / "manifest.json"))["stage"] == "done"


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_its_time_budget_ended_is_not_complete_and_each_resume_takes_a_new_budget(tmp_path, capsys):
    # a budget no candidate fits in ends the run (exit 1); resumed with 20 s: 12 candidates of at least 2 s each, one
    # at a time, need 24 s or more, so 20 s (from Tune's start, which includes the trial process's start) ends it
    # early, and the best so far are fine-tuned (the top 1); resumed without a budget, it evaluates the rest
    run, n = tmp_path / "run", 12
    with embedded_ray(delay_s=2.0):
        assert main(run_args(tmp_path, "search.time_budget_s=0.001", "search.batch_size=2", candidates=n)) == 1
        err = capsys.readouterr().err
        assert "search stopped: no candidate was evaluated within search.time_budget_s=0.001" in err
        assert not CandidateStore(str(run)).indices()
        code = main(["resume", str(run), "--set", "search.time_budget_s=20"])
        stored = len(CandidateStore(str(run)).indices())
        out, err = capsys.readouterr()
        assert 0 < stored < n and code == 0 or stored == 0 and code == 1  # 0: a machine too busy for one candidate
        if stored:  # the usual case: the best so far are fine-tuned, and the run says it is not complete
            assert (f"search stopped on its time budget (search.time_budget_s=20) with {stored}/{n} candidates; the "
                    f"run is not complete: `prunetune resume {run}` evaluates the other {n - stored}") in err
            summary = json.load(open(run / "final" / "summary.json"))
            assert summary["search"]["candidates"] == stored and len(summary["final"]) == 1
        else:  # a machine too busy to finish one candidate in 20 s: said so
            assert "no candidate was evaluated within search.time_budget_s=20" in err
        assert json.load(open(run / "manifest.json"))["stage"] == "search"
        assert main(["resume", str(run), "--set", "search.time_budget_s=none"]) == 0
        assert "resuming" in capsys.readouterr().out
    assert sorted(pq.read_table(run / "candidates.parquet").column("index").to_pylist()) == list(range(n))
    assert json.load(open(run / "manifest.json"))["stage"] == "done"
    assert json.load(open(run / "final" / "summary.json"))["search"]["candidates"] == n
    assert main(["resume", str(run)]) == 0 and "already complete" in capsys.readouterr().out


def test_an_unfinished_search_is_counted_without_a_set_of_every_candidate_number(tmp_path):
    import tracemalloc

    from prunetune.search.stages import unfinished_search

    cfg = SimpleNamespace(search=SimpleNamespace(num_candidates=10**6, time_budget_s=20.0))
    records = [CandidateRecord(i, [0.1], score=0.5) for i in (0, 3, 10**6 + 5)]  # the last: beyond num_candidates
    tracemalloc.start()
    try:
        message = unfinished_search(records, cfg, RunDir(str(tmp_path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "with 2/1000000 candidates" in message and "evaluates the other 999998" in message
    assert peak < 1_000_000  # a set of range(10**6) alone takes tens of MB
