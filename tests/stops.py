"""What tests/test_resume.py and tests/test_interrupts.py share: the small run they stop (the driver in its own
process, with worker faults from tests.faults), the ways to stop it, and the check that a resumed run equals an
uninterrupted one with the same seed (the same candidates, each stored once, the same scores and final models)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from prunetune.search.runfiles import read_summary
from prunetune.search.store import CandidateStore
from tests.faults import ROOT, sigint_as_in_a_terminal
from tests.runs import as_args, small

N = 8


def start(args, output, pause_between_stages=0.0, **faults):
    """The driver in its own process group (the kill takes its Ray too), with worker faults from tests.faults;
    SIGINT reaches it as Ctrl-C would even when pytest runs in the background."""
    env = {**os.environ, **{f"PRUNETUNE_TEST_{k.upper()}": str(v) for k, v in faults.items()}}
    return subprocess.Popen([sys.executable, "-m", "tests.faults", str(pause_between_stages), *args], env=env,
                            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)


def run_args(run, cache, *extra):
    """`prunetune run` arguments of the run every test here stops: N candidates over two trials at a time, the best
    fine-tuned 3 epochs (one finalist: each trial process costs a run 4-6 CPU s of imports, and the suite is
    CPU-bound)."""
    return ["run", *as_args(small(run, cache, "ray.num_cpus=2", "search.max_concurrent_trials=2", *extra,
                                  candidates=N, top_k=1, epochs=3))]


def uninterrupted(tmp_path_factory):
    """The run, uninterrupted, and the cache of its base model (which the stopped runs share): (run, cache). One per
    session: under xdist the first worker to ask runs it in the workers' common folder while the others wait for it
    (xdist's recipe for a session fixture that runs once)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's popen-gwK/
    tmp, cache = root / "uninterrupted", root / "uninterrupted-cache"
    with FileLock(str(root / "uninterrupted.lock")):
        if not (tmp / "run" / "final" / "summary.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)  # what a failed try left
            tmp.mkdir()
            with open(tmp / "driver.log", "ab") as log:
                proc = start(run_args(tmp / "run", cache), log)
                assert proc.wait(timeout=300) == 0, (tmp / "driver.log").read_text()[-3000:]
    return tmp / "run", cache


def kill(proc):
    """SIGKILL to the driver's process group."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(predicate, proc, timeout, what):
    """Poll `predicate` until it holds; fail if the driver exits first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"driver exited early while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def finish(run, log_path, **faults):
    """`prunetune resume` the run to its end (exit 0)."""
    with open(log_path, "ab") as log:
        proc = start(["resume", str(run)], log, **faults)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]


def stopped(run, log_path, until, what, stop, pause_between_stages=0.0, **faults):
    """`prunetune resume` the run, wait until `until()`, stop the driver with `stop`."""
    with open(log_path, "ab") as log:
        proc = start(["resume", str(run)], log, pause_between_stages, **faults)
        wait_for(until, proc, 240, what)
        stop(proc)


def assert_same_result(run, reference):
    """Each candidate stored exactly once, with the reference's ratios, FLOPs and scores; the same final models."""
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


def stored(run, n):
    """At least n candidates stored."""
    return lambda: len(CandidateStore(str(run)).indices()) >= n


def stage_is(run, stage):
    """The manifest says `stage`."""
    return lambda: (run / "manifest.json").exists() and json.load(open(run / "manifest.json"))["stage"] == stage


def checkpointed(run):
    """A fine-tuning checkpoint written."""
    checkpoints = run / "tune" / "finetune"
    return lambda: checkpoints.is_dir() and any(checkpoints.glob("finalist*/checkpoint_*"))


def stopper(signum: int, group: bool = False):
    """Sends `signum` to the driver (or its process group); the driver must exit 128 + signum."""
    def stop(proc):
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
    return stop


def assert_one_line_with_the_resume_hint(log_path, run, signum):
    """The driver said, in one line and without a traceback, that `signum` interrupted it and how to resume."""
    log = log_path.read_text()
    how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    assert f"prunetune: {how}; the run is kept as it was: continue it with `prunetune resume {run}`" in log
    assert "Traceback" not in log and "received at time" not in log and "PC: @" not in log, log[-3000:]


def interrupted_run(reference, tmp_path, until, what, stop, pause_between_stages=0.0, extra=(), **faults):
    """Start the reference's run in a new directory, wait until `until(run)()`, stop the driver with `stop`."""
    run, log_path = tmp_path / "run", tmp_path / "driver.log"
    with open(log_path, "ab") as log:
        proc = start(run_args(run, reference[1], *extra), log, pause_between_stages, **faults)
        wait_for(until(run), proc, 240, what)
        stop(proc)
    return run, log_path
