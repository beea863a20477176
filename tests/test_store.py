"""The search's ledger without Ray: driven with fake results, as Tune would call it (group commit, leaderboard,
progress, failed fraction)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

from prunetune.search.config import load_config
from prunetune.search.rundir import RunDir
from prunetune.search.store import CandidateStore, sha256
from prunetune.search.ledger import Ledger, LedgerStopper, leaderboard_path
from prunetune.search.tune_search import StrategySearcher
from prunetune.workers.record import CandidateRecord

TOTAL = 300


class FrozenClock:
    """A clock that moves only when told: the tests never depend on how fast the machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(tmp_path) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    run.create(load_config(), overwrite=False)
    return run


def _result(index: int) -> dict:
    return CandidateRecord(index, [0.1, 0.2], score=index / TOTAL, flops=1000 - index, params=10).to_dict()


class _Numbered:
    """A search algorithm for the searcher's bookkeeping: candidate i is [i / 10]."""

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
        return [index / 10]

    def observe(self, record) -> None:
        pass


def _ledger(run: RunDir, clock, **kwargs) -> Ledger:
    searcher = StrategySearcher(_Numbered(), "numbered", [], TOTAL, CandidateStore(run.path))
    return Ledger(run.path, TOTAL, searcher, group_size=64, interval_s=1.0, clock=clock, **kwargs)


def _feed(callback: Ledger, indices, result=_result) -> None:
    for i in indices:
        callback.on_trial_result(0, [], SimpleNamespace(trial_id=f"t{i:05d}", config={}), result(i))


def _manifest_parts(run: RunDir) -> dict:
    return json.load(open(run.manifest_path))["candidates"]["parts"]


def _assert_manifest_matches_disk(run: RunDir) -> None:
    store = CandidateStore(run.path)
    parts = _manifest_parts(run)
    assert sorted(parts) == sorted(os.path.basename(p) for p in store.parts())
    assert all(sha256(os.path.join(store.path, name)) == digest for name, digest in parts.items())
    assert store.verify(run.manifest().candidates) == []


def test_results_are_committed_in_groups_each_stored_once(tmp_path, capsys):
    run, clock = _run(tmp_path), FrozenClock()
    callback = _ledger(run, clock)
    _feed(callback, range(TOTAL))
    _feed(callback, [5, 17, 250])  # Tune showing a result again: never stored twice
    callback.on_experiment_end(trials=[])

    store = CandidateStore(run.path)
    indices = store.read().column("index").to_pylist()
    assert sorted(indices) == list(range(TOTAL))  # every record once, across all parts
    # the first record commits at once, then one part per 64 (the clock never moves), the rest at the end
    assert len(store.parts()) == 1 + (TOTAL - 1) // 64 + 1 < TOTAL // 10
    _assert_manifest_matches_disk(run)
    assert json.load(open(run.manifest_path))["candidates"]["rows"] == TOTAL
    assert callback.count == TOTAL and callback.new == TOTAL and not callback.pending
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[search] candidates ")]
    assert lines[-1].startswith(f"[search] candidates {TOTAL}/{TOTAL} | best score {(TOTAL - 1) / TOTAL:.4f} |")
    assert len(lines) == 2  # the clock never moved: the first line and the one at the end, not one per candidate


def test_the_interval_closes_a_group_and_a_quiet_step_commits_it(tmp_path, capsys):
    run, clock = _run(tmp_path), FrozenClock()
    callback = _ledger(run, clock)
    _feed(callback, range(10))
    assert len(CandidateStore(run.path).parts()) == 1 and len(callback.pending) == 9  # under the bound: buffered
    clock.now += 1.0
    callback.on_step_end(iteration=1, trials=[])  # no result arrives: Tune's loop step still commits
    assert not callback.pending and len(CandidateStore(run.path).parts()) == 2
    assert sorted(CandidateStore(run.path).indices()) == list(range(10))
    _assert_manifest_matches_disk(run)
    assert capsys.readouterr().out.splitlines()[-1].startswith("[search] candidates 10/300 ")


def test_a_flush_commits_the_buffer_as_on_an_interrupt_and_a_resume_continues(tmp_path):
    run, clock = _run(tmp_path), FrozenClock()
    callback = _ledger(run, clock)
    _feed(callback, range(40))
    assert len(callback.pending) == 39
    callback.flush()  # what run_search's `finally` calls when Ctrl-C leaves Tune's loop
    assert CandidateStore(run.path).indices() == set(range(40)) and not callback.pending
    _assert_manifest_matches_disk(run)

    # a resumed search: a new callback seeds its counter and the manifest's part list once, then adds to them
    resumed = _ledger(run, clock)
    resumed.setup()
    _feed(resumed, range(30, 140))  # 30..39 already stored: not written again
    resumed.on_experiment_end(trials=[])
    store = CandidateStore(run.path)
    assert sorted(store.read().column("index").to_pylist()) == list(range(140))
    assert resumed.count == 140 and resumed.new == 100
    _assert_manifest_matches_disk(run)
    assert json.load(open(run.manifest_path))["candidates"]["rows"] == 140


def test_append_dedupes_many_records_within_and_across_parts(tmp_path):
    store = CandidateStore(str(tmp_path))
    records = [CandidateRecord(i % 500, [0.1], score=float(i)) for i in range(1000)]  # each index twice
    first = store.append(records)
    assert store.append(records[:700]) is None  # all stored already
    second = store.append([CandidateRecord(i, [0.1], score=-1.0) for i in range(450, 550)])
    rows = CandidateStore(str(tmp_path)).read().to_pylist()
    assert sorted(r["index"] for r in rows) == list(range(550))
    assert {r["index"]: r["score"] for r in rows}[7] == 7.0  # the first record of an index wins
    assert pq_rows(first) == 500 and pq_rows(second) == 50
    manifest = store.manifest()
    assert manifest.rows == 550 and set(manifest.parts) == {os.path.basename(first), os.path.basename(second)}
    assert store.verify(manifest) == []
    store.compact()
    third = store.append([CandidateRecord(600, [0.1], score=0.0)])
    assert [os.path.basename(p)[:11] for p in store.parts()] == ["part-000000", "part-000001"]
    assert os.path.basename(third).startswith("part-000001-")


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def _board(run: RunDir) -> list[int]:
    return [row["index"] for row in json.load(open(leaderboard_path(run.path)))]


def test_the_leaderboard_holds_the_best_committed_candidates_never_one_received_only(tmp_path):
    run, clock = _run(tmp_path), FrozenClock()
    ledger = _ledger(run, clock, top_k=3)
    _feed(ledger, [0, 1])  # the first commits at once, the second waits for its group
    assert _board(run) == [0] and len(ledger.pending) == 1
    _feed(ledger, range(200, 210))  # better scores, received: not on the board before they are committed
    assert _board(run) == [0] and CandidateStore(run.path).indices() == {0}
    clock.now += 1.0
    ledger.on_step_end(iteration=1, trials=[])
    assert _board(run) == [209, 208, 207]
    resumed = _ledger(run, clock, top_k=3)  # a resumed search's board starts from what the store holds
    _feed(resumed, [100, 250])
    resumed.flush()
    assert _board(run) == [250, 209, 208]


def test_the_rate_is_counted_from_the_first_candidate_and_the_line_shows_the_time_left(tmp_path, capsys):
    run, clock = _run(tmp_path), FrozenClock()
    ledger = _ledger(run, clock)
    clock.now += 600.0  # Ray's start-up and the first trial's: not in the rate
    _feed(ledger, [0])
    for i in range(1, 11):
        clock.now += 6.0
        _feed(ledger, [i])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[search] candidates ")]
    assert lines[0] == "[search] candidates 1/300 | best score 0.0000 | n/a candidates/min"
    assert lines[-1] == "[search] candidates 11/300 | best score 0.0333 | 10.0 candidates/min | ETA 29 min"


def test_the_ledger_stops_the_search_when_too_many_candidates_fail(tmp_path):
    run, clock = _run(tmp_path), FrozenClock()
    ledger = _ledger(run, clock, max_failed_fraction=0.5, minimum=4)
    stopper = LedgerStopper(ledger)

    def failed(i: int) -> dict:
        return CandidateRecord.failed(i, [0.1], "RuntimeError: boom").to_dict()

    _feed(ledger, [0, 1], failed)
    _feed(ledger, [2])
    _feed(ledger, [1], failed)  # a result shown again counts once
    assert not stopper.stop_all()  # 2 of 3 failed, fewer than the minimum of 4 results
    ledger.on_trial_result(0, [], SimpleNamespace(trial_id="t", config={}), {"done": True, "training_iteration": 1})
    assert not stopper.stop_all()  # Tune's own result is no candidate
    _feed(ledger, [3], failed)
    assert stopper("t00003", failed(3)) is False and stopper.stop_all()  # 3 of 4 failed


def test_while_the_trials_start_the_ledger_says_it_waits_for_the_first_candidate_and_stops_once_it_came(
        tmp_path, capsys, monkeypatch):
    from prunetune.workers import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 10.0)
    run, clock = _run(tmp_path), FrozenClock()
    ledger = _ledger(run, clock)
    for _ in range(3):  # Tune's loop steps while Ray starts the trials: a line every 10 s, none in between
        clock.now += 6.0
        ledger.on_step_end(iteration=0, trials=[])
    waiting = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[search] waiting")]
    assert waiting == ["[search] waiting for the first candidate (0:12): the trials start and load the model and data"]
    _feed(ledger, [0])
    clock.now += 60.0
    ledger.on_step_end(iteration=1, trials=[])
    assert "waiting" not in capsys.readouterr().out
