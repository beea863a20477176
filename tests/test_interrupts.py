"""Resume after the driver is stopped by Ctrl-C or SIGTERM, or by a full disk (SIGHUP, the same handler:
tests/test_reliability.py; killed with SIGKILL: tests/test_resume.py).

Each resumed run must equal an uninterrupted run with the same seed: the same candidates, each stored once, the
same scores and the same final models.
"""
import json
import signal

import pytest

from prunetune.search.runfiles import read_manifest
from prunetune.search.store import CandidateStore
from tests.stops import (N, assert_one_line_with_the_resume_hint, assert_same_result, checkpointed, finish,
                         interrupted_run, stopped, stopper, stored, uninterrupted)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory)


def _assert_stopped_in_the_search(run, log_path, signum):
    assert_one_line_with_the_resume_hint(log_path, run, signum)
    assert json.load(open(run / "manifest.json"))["stage"] == "search"
    assert 3 <= len(CandidateStore(str(run)).indices()) < N and not (run / "final").exists()


def _assert_stopped_while_fine_tuning(run, log_path, signum):
    assert_one_line_with_the_resume_hint(log_path, run, signum)
    assert json.load(open(run / "manifest.json"))["stage"] == "finetune"
    assert not (run / "final" / "summary.json").exists()


# Ctrl-C (a terminal sends SIGINT to the whole process group), and what kill, timeout, systemd, Kubernetes, Slurm and
# `ray job stop` send (SIGTERM): each stops the driver the same way (SIGHUP, the terminal closed, too: the same
# handler, tests/test_reliability.py); a full disk stops it with exit 1
def test_interrupts_and_a_full_disk_stop_the_run_resumably(reference, tmp_path):
    """One run stopped four times, each time resumed: Ctrl-C in the search; the driver's disk full in the search
    (each write then fails with ENOSPC after writing part of its data): one line, exit 1, every part stored before
    intact; SIGTERM in the search; Ctrl-C while fine-tuning. Each interrupt gives one line with the resume hint and
    keeps the stage, and the last resume ends where the uninterrupted run did. The stops in a resumed search come
    once one of its evaluations (5 s each) has started, so a candidate is still to be stored."""
    run, log_path = interrupted_run(reference, tmp_path, lambda run: stored(run, 3), "3 stored candidates",
                                    stopper(signal.SIGINT, group=True), delay_s=1.0)
    _assert_stopped_in_the_search(run, log_path, signal.SIGINT)

    full, started = tmp_path / "disk-is-full", tmp_path / "started.log"

    def fill_the_disk(proc):
        full.touch()
        assert proc.wait(timeout=120) == 1

    stopped(run, log_path, _an_evaluation_started(started), "an evaluation started", fill_the_disk, delay_s=5.0,
            log=started, disk_full=full)
    log = log_path.read_text()
    assert ("output.dir: no space left on " in log
            and f"MB free); free space and continue with `prunetune resume {run}`" in log), log[-3000:]
    assert "Traceback" not in log and "Errno 28" not in log, log[-3000:]
    manifest = read_manifest(str(run))
    assert manifest.stage == "search" and CandidateStore(str(run)).verify(manifest.candidates) == []
    assert 3 <= len(CandidateStore(str(run)).indices()) < N
    assert not [*run.glob(".*.tmp"), *(run / "candidates.parquet").glob(".*.tmp")]  # no half-written file left
    full.unlink()

    started = tmp_path / "started-again.log"
    stopped(run, log_path, _an_evaluation_started(started), "an evaluation started", stopper(signal.SIGTERM),
            delay_s=5.0, log=started)
    _assert_stopped_in_the_search(run, log_path, signal.SIGTERM)
    stopped(run, log_path, checkpointed(run), "a fine-tuning checkpoint", stopper(signal.SIGINT, group=True),
            delay_s=1.0)
    _assert_stopped_while_fine_tuning(run, log_path, signal.SIGINT)
    finish(run, log_path)
    assert_same_result(run, reference[0])


def _an_evaluation_started(log):
    """A worker has logged the start of an evaluation to `log`."""
    return lambda: log.exists() and log.read_text().strip()
