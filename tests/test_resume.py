"""Resume after the driver is killed with SIGKILL: in the search, between the stages, while fine-tuning (one run
killed at each point in turn), before a group commit, and in a learning search. Stopped by a signal or a full disk:
tests/test_interrupts.py.

Each resumed run must equal an uninterrupted run with the same seed: the same candidates, each stored once, the
same scores and the same final models.
"""
import json
import re
import signal
from collections import Counter

import pytest

from prunetune.search.baselines import BASELINES
from prunetune.search.store import CandidateStore
from prunetune.workers.record import best
from tests.faults import UNCOMMITTED
from tests.stops import (N, assert_same_result, checkpointed, finish, interrupted_run, kill, run_args, stage_is,
                         start, stopped, stored, uninterrupted, wait_for)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory)


def test_driver_killed_during_the_search_between_the_stages_and_while_fine_tuning(reference, tmp_path):
    """One run killed three times. Mid-batch: each trial evaluates 4 candidates (8 over 2 slots), and the kill comes
    after 3 are stored, so a trial has reported part of its batch; the resume evaluates each missing candidate once.
    Then at the end of the search (before fine-tuning starts), then after a fine-tuning checkpoint: each resume
    goes on from there, and the last ends where the uninterrupted run did."""
    evaluations = tmp_path / "evaluations.log"
    run, log_path = interrupted_run(reference, tmp_path, lambda run: stored(run, 3), "3 stored candidates", kill,
                                    log=evaluations, delay_s=1.0)
    stored_before = {r.index: r.score for r in CandidateStore(str(run)).records()}
    assert 3 <= len(stored_before) < N
    killed_in_the_search = len(log_path.read_text())

    stopped(run, log_path, stage_is(run, "finetune"), "the end of the search", kill, pause_between_stages=60,
            log=evaluations)
    resumed = log_path.read_text()[killed_in_the_search:].split("resuming")[-1]
    first = float(re.search(r"best score ([\d.]+)", resumed).group(1))
    assert first >= round(max(stored_before.values()), 4)  # the progress line counts what was stored before the kill
    assert not (run / "tune" / "finetune").exists()

    stopped(run, log_path, checkpointed(run), "a fine-tuning checkpoint", kill, log=evaluations, delay_s=1.0)
    assert json.load(open(run / "manifest.json"))["stage"] == "finetune"
    restored = len(log_path.read_text())
    finish(run, log_path, log=evaluations)
    assert "[finetune] restoring the Tune experiment" in log_path.read_text()[restored:]
    counts = Counter(int(line) for line in evaluations.read_text().split())
    assert all(counts[i] == 1 for i in stored_before)  # nothing already stored was evaluated again
    assert set(counts) == set(range(N))
    assert_same_result(run, reference[0])


def test_a_kill_between_results_and_their_group_commit_leaves_a_leaderboard_of_committed_candidates(tmp_path):
    """The driver kills itself (SIGKILL, its Ray with it) just before its second group commit, with the results
    received since the first in its buffer: they are lost, and leaderboard.json names only stored candidates."""
    run, log_path = tmp_path / "run", tmp_path / "driver.log"
    with open(log_path, "ab") as log:
        proc = start(run_args(run, tmp_path / "cache"), log, kill_at_commit=2, markers=tmp_path)
        assert proc.wait(timeout=300) == -signal.SIGKILL, log_path.read_text()[-3000:]
    uncommitted = json.load(open(tmp_path / UNCOMMITTED))
    records = CandidateStore(str(run)).records()
    board = [row["index"] for row in json.load(open(run / "leaderboard.json"))]
    assert uncommitted and records and not {r.index for r in records} & set(uncommitted)
    assert board == [r.index for r in best(records, 2)] and not set(board) & set(uncommitted)


def test_a_learning_search_killed_and_resumed_proposes_what_it_would_have(reference, tmp_path):
    """Both runs (uninterrupted, and killed then resumed) end when their search does (killed between the stages):
    only the candidates are compared, and a fine-tuning would cost each a trial process."""
    # the default algorithm, one trial at a time, in batches of 2: each batch is proposed from the records of the
    # batches before it, so the proposals after the kill (from 6 stored) depend on what the search learnt
    serial = ("search.algorithm=tpe", "search.population=3", "search.max_concurrent_trials=1", "search.batch_size=2")
    uninterrupted_run = tmp_path / "uninterrupted"
    with open(tmp_path / "reference.log", "ab") as log:
        proc = start(run_args(uninterrupted_run, reference[1], *serial), log, pause_between_stages=60)
        wait_for(stage_is(uninterrupted_run, "finetune"), proc, 240, "the end of the uninterrupted search")
        kill(proc)
    run, log_path = interrupted_run(reference, tmp_path, lambda run: stored(run, 6), "6 stored candidates", kill,
                                    extra=serial, delay_s=1.0)
    assert 6 <= len(CandidateStore(str(run)).indices()) < N
    stopped(run, log_path, stage_is(run, "finetune"), "the end of the resumed search", kill, pause_between_stages=60)
    ours, theirs = CandidateStore(str(run)).records(), CandidateStore(str(uninterrupted_run)).records()
    assert [(r.index, r.source, r.ratios) for r in ours] == [(r.index, r.source, r.ratios) for r in theirs]
    assert {r.source for r in ours} == {*BASELINES, "tpe"}
