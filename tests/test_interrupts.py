"""Resume after the driver is stopped by Ctrl-C, SIGTERM or SIGHUP, or by a full disk (killed with SIGKILL:
tests/test_resume.py).

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


# Ctrl-C (a terminal sends SIGINT to the whole process group), what kill, timeout, systemd, Kubernetes, Slurm and
# `ray job stop` send (SIGTERM), and what a closed terminal sends (SIGHUP): each stops the driver the same way
def test_an_interrupt_in_either_stage_stops_the_run_resumably(reference, tmp_path):
    """One run stopped three times: Ctrl-C in the search, then (resumed) SIGHUP in the search, then (resumed)
    SIGTERM while fine-tuning (Ctrl-C while fine-tuning: the full-disk test below; the three share one handler):
    each time one line with the resume hint and the stage kept, and the last resume ends where the uninterrupted
    run did."""
    run, log_path = interrupted_run(reference, tmp_path, lambda run: stored(run, 3), "3 stored candidates",
                                    stopper(signal.SIGINT, group=True), delay_s=1.0)
    _assert_stopped_in_the_search(run, log_path, signal.SIGINT)
    started = tmp_path / "started.log"  # each evaluation the resumed run starts; each takes 5 s or more
    stopped(run, log_path, lambda: started.exists() and started.read_text().strip(), "an evaluation started",
            stopper(signal.SIGHUP), delay_s=5.0, log=started)
    _assert_stopped_in_the_search(run, log_path, signal.SIGHUP)
    stopped(run, log_path, checkpointed(run), "a fine-tuning checkpoint", stopper(signal.SIGTERM), delay_s=1.0)
    _assert_stopped_while_fine_tuning(run, log_path, signal.SIGTERM)
    finish(run, log_path)
    assert_same_result(run, reference[0])


def test_a_full_disk_stops_the_run_in_one_line_and_the_resume_completes_it(reference, tmp_path):
    """The driver's disk fills mid-search (each write then fails with ENOSPC after writing part of its data): one
    line, exit 1, every part stored before intact; freed, `resume` goes on (stopped once more, by Ctrl-C while
    fine-tuning, and resumed) and ends where the uninterrupted run did."""
    full = tmp_path / "disk-is-full"

    def fill_the_disk(proc):
        full.touch()
        assert proc.wait(timeout=120) == 1

    run, log_path = interrupted_run(reference, tmp_path, lambda run: stored(run, 3), "3 stored candidates",
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
    stopped(run, log_path, checkpointed(run), "a fine-tuning checkpoint", stopper(signal.SIGINT, group=True),
            delay_s=1.0)
    _assert_stopped_while_fine_tuning(run, log_path, signal.SIGINT)
    finish(run, log_path)
    assert_same_result(run, reference[0])
