"""Resume after the driver is killed with SIGKILL (in the search, between the stages, while fine-tuning), stopped by
Ctrl-C, SIGTERM or SIGHUP, or stopped by a full disk.

Each resumed run must equal an uninterrupted run with the same seed: the same candidates, each stored once, the
same scores and the same final models.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from prunetune.search.baselines import BASELINES
from prunetune.search.runfiles import read_manifest, read_summary
from prunetune.search.store import CandidateStore
from prunetune.workers.record import best
from tests.faults import ROOT, UNCOMMITTED, sigint_as_in_a_terminal
from tests.runs import as_args, small

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N = 8


def _start(args, output, pause_between_stages=0.0, **faults):
    """The driver in its own process group (the kill takes its Ray too), with worker faults from tests.faults;
    SIGINT reaches it as Ctrl-C would even when pytest runs in the background."""
    env = {**os.environ, **{f"PRUNETUNE_TEST_{k.upper()}": str(v) for k, v in faults.items()}}
    return subprocess.Popen([sys.executable, "-m", "tests.faults", str(pause_between_stages), *args], env=env,
                            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)


def _run_args(run, cache, *extra):
    return ["run", *as_args(small(run, cache, "ray.num_cpus=2", *extra, candidates=N, top_k=2, epochs=3))]


def _kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for(predicate, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"driver exited early while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(run, log_path, **faults):
    with open(log_path, "ab") as log:
        proc = _start(["resume", str(run)], log, **faults)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]


def _assert_same_result(run, reference):
    raw = pq.read_table(run / "candidates.parquet").column("index").to_pylist()
    assert sorted(raw) == list(range(N))  # each candidate exactly once
    ours = {r.index: r for r in CandidateStore(str(run)).records()}
    theirs = {r.index: r for r in CandidateStore(str(reference)).records()}
    assert sorted(ours) == sorted(theirs)
    for i in ours:
        assert ours[i].ratios == theirs[i].ratios and ours[i].flops == theirs[i].flops
        assert abs(ours[i].score - theirs[i].score) < 1e-9 and abs(ours[i].loss - theirs[i].loss) < 1e-6
    final, expected = read_summary(str(run)).final, read_summary(str(reference)).final
    assert [f.candidate for f in final] == [f.candidate for f in expected]
    assert all(f.epochs == 3 for f in final)
    for a, b in zip(final, expected):
        assert abs(a.val - b.val) < 1e-9 and abs(a.test - b.test) < 1e-9
    assert not (run / "run.lock").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    with open(tmp / "driver.log", "ab") as log:
        proc = _start(_run_args(tmp / "run", tmp_path_factory.getbasetemp() / "cache"), log)
        assert proc.wait(timeout=300) == 0, (tmp / "driver.log").read_text()[-3000:]
    return tmp / "run", tmp_path_factory.getbasetemp() / "cache"


def _stored(run, n):
    return lambda: len(CandidateStore(str(run)).indices()) >= n


def _stage_is(run, stage):
    return lambda: (run / "manifest.json").exists() and json.load(open(run / "manifest.json"))["stage"] == stage


def _checkpointed(run):
    checkpoints = run / "tune" / "finetune"
    return lambda: checkpoints.is_dir() and any(checkpoints.glob("finalist*/checkpoint_*"))


def _stopper(signum: int, group: bool = False):
    """Sends `signum` to the driver (or its process group); the driver must exit 128 + signum."""
    def stop(proc):
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
    return stop


def _assert_one_line_with_the_resume_hint(log_path, run, signum):
    log = log_path.read_text()
    how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    assert f"prunetune: {how}; the run is kept as it was: continue it with `prunetune resume {run}`" in log
    assert "Traceback" not in log and "received at time" not in log and "PC: @" not in log, log[-3000:]


def _interrupted_run(reference, tmp_path, until, what, stop, pause_between_stages=0.0, extra=(), **faults):
    """Start the reference's run in a new directory, wait until `until(run)()`, stop the driver with `stop`."""
    run, log_path = tmp_path / "run", tmp_path / "driver.log"
    with open(log_path, "ab") as log:
        proc = _start(_run_args(run, reference[1], *extra), log, pause_between_stages, **faults)
        _wait_for(until(run), proc, 240, what)
        stop(proc)
    return run, log_path


def test_driver_killed_during_the_search(reference, tmp_path):
    """Killed mid-batch: each trial evaluates 4 candidates (8 over 2 slots), and the kill comes after 3 are stored,
    so a trial has reported part of its batch; the resume evaluates each missing candidate once."""
    evaluations = tmp_path / "evaluations.log"
    run, log_path = _interrupted_run(reference, tmp_path, lambda run: _stored(run, 3), "3 stored candidates", _kill,
                                     log=evaluations, delay_s=1.0)
    stored_before = {r.index: r.score for r in CandidateStore(str(run)).records()}
    assert 3 <= len(stored_before) < N
    _finish(run, log_path, log=evaluations)
    resumed = log_path.read_text().split("resuming")[-1]
    first = float(re.search(r"best score ([\d.]+)", resumed).group(1))
    assert first >= round(max(stored_before.values()), 4)  # the progress line counts what was stored before the kill
    counts = Counter(int(line) for line in evaluations.read_text().split())
    assert all(counts[i] == 1 for i in stored_before)  # nothing already stored was evaluated again
    assert set(counts) == set(range(N))
    _assert_same_result(run, reference[0])


def test_a_kill_between_results_and_their_group_commit_leaves_a_leaderboard_of_committed_candidates(tmp_path):
    """The driver kills itself (SIGKILL, its Ray with it) just before its second group commit, with the results
    received since the first in its buffer: they are lost, and leaderboard.json names only stored candidates."""
    run, log_path = tmp_path / "run", tmp_path / "driver.log"
    with open(log_path, "ab") as log:
        proc = _start(_run_args(run, tmp_path / "cache"), log, kill_at_commit=2, markers=tmp_path)
        assert proc.wait(timeout=300) == -signal.SIGKILL, log_path.read_text()[-3000:]
    uncommitted = json.load(open(tmp_path / UNCOMMITTED))
    stored = CandidateStore(str(run)).records()
    board = [row["index"] for row in json.load(open(run / "leaderboard.json"))]
    assert uncommitted and stored and not {r.index for r in stored} & set(uncommitted)
    assert board == [r.index for r in best(stored, 2)] and not set(board) & set(uncommitted)


def test_driver_killed_between_the_stages(reference, tmp_path):
    run, log_path = _interrupted_run(reference, tmp_path, lambda run: _stage_is(run, "finetune"),
                                     "the end of the search", _kill, pause_between_stages=60)
    assert not (run / "tune" / "finetune").exists()
    _finish(run, log_path)
    _assert_same_result(run, reference[0])


def test_driver_killed_while_fine_tuning(reference, tmp_path):
    run, log_path = _interrupted_run(reference, tmp_path, _checkpointed, "a fine-tuning checkpoint", _kill,
                                     delay_s=1.0)
    assert json.load(open(run / "manifest.json"))["stage"] == "finetune"
    _finish(run, log_path)
    assert "[finetune] restoring the Tune experiment" in log_path.read_text()
    _assert_same_result(run, reference[0])


# Ctrl-C (a terminal sends SIGINT to the whole process group), what kill, timeout, systemd, Kubernetes, Slurm and
# `ray job stop` send (SIGTERM), and what a closed terminal sends (SIGHUP): each stops the driver the same way
@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGHUP, signal.SIGINT)],
                         ids=lambda s: signal.Signals(s).name)
def test_an_interrupt_in_either_stage_stops_the_run_resumably(reference, tmp_path, first, second):
    """Each signal once, Ctrl-C in both stages (two runs; the three share one handler): one line with the resume
    hint, the stage kept, and the resumes end where the uninterrupted run did."""
    run, log_path = _interrupted_run(reference, tmp_path, lambda run: _stored(run, 3), "3 stored candidates",
                                     _stopper(first, group=first == signal.SIGINT), delay_s=1.0)
    _assert_one_line_with_the_resume_hint(log_path, run, first)
    assert json.load(open(run / "manifest.json"))["stage"] == "search"
    assert 3 <= len(CandidateStore(str(run)).indices()) < N and not (run / "final").exists()
    with open(log_path, "ab") as log:
        proc = _start(["resume", str(run)], log, delay_s=1.0)
        _wait_for(_checkpointed(run), proc, 240, "a fine-tuning checkpoint")
        _stopper(second, group=second == signal.SIGINT)(proc)
    _assert_one_line_with_the_resume_hint(log_path, run, second)
    assert json.load(open(run / "manifest.json"))["stage"] == "finetune"
    assert not (run / "final" / "summary.json").exists()
    _finish(run, log_path)
    _assert_same_result(run, reference[0])


def test_a_full_disk_stops_the_run_in_one_line_and_the_resume_completes_it(reference, tmp_path):
    """The driver's disk fills mid-search (each write then fails with ENOSPC after writing part of its data): one
    line, exit 1, every part stored before intact; freed, `resume` ends where the uninterrupted run did."""
    full = tmp_path / "disk-is-full"

    def fill_the_disk(proc):
        full.touch()
        assert proc.wait(timeout=120) == 1

    run, log_path = _interrupted_run(reference, tmp_path, lambda run: _stored(run, 3), "3 stored candidates",
                                     fill_the_disk, delay_s=1.0, disk_full=full)
    log = log_path.read_text()
    assert ("output.dir: no space left on " in log
            and f"MB free); free space and continue with `prunetune resume {run}`" in log), log[-3000:]
    assert "Traceback" not in log and "Errno 28" not in log, log[-3000:]
    manifest = read_manifest(str(run))
    assert manifest.stage == "search" and CandidateStore(str(run)).verify(manifest.candidates) == []
    assert 3 <= len(CandidateStore(str(run)).indices()) < N
    assert not [*run.glob(".*.tmp"), *(run / "candidates.parquet").glob(".*.tmp")]  # no half-written file left
    full.unlink()
    _finish(run, log_path)
    _assert_same_result(run, reference[0])


def test_a_learning_search_killed_and_resumed_proposes_what_it_would_have(reference, tmp_path):
    serial = ("search.algorithm=tpe", "search.population=3", "search.max_concurrent_trials=1")  # the default algorithm
    uninterrupted = tmp_path / "uninterrupted"
    with open(tmp_path / "reference.log", "ab") as log:
        assert _start(_run_args(uninterrupted, reference[1], *serial), log).wait(timeout=300) == 0
    run, log_path = _interrupted_run(reference, tmp_path, lambda run: _stored(run, 6), "6 stored candidates", _kill,
                                     extra=serial, delay_s=1.0)
    assert 6 <= len(CandidateStore(str(run)).indices()) < N
    _finish(run, log_path)
    ours, theirs = CandidateStore(str(run)).records(), CandidateStore(str(uninterrupted)).records()
    assert [(r.index, r.source, r.ratios) for r in ours] == [(r.index, r.source, r.ratios) for r in theirs]
    assert {r.source for r in ours} == {*BASELINES, "tpe"}
