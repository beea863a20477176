"""Faults survived: a worker process that dies, a node that goes away, candidates that fail."""
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import ray
from ray.tune.search import Searcher

from prunetune.search.cli import main
from prunetune.search.config import load_config
from prunetune.search.ledger import Ledger
from prunetune.search.rundir import RunDir
from prunetune.search.store import CandidateStore
from prunetune.search.tune_search import StrategySearcher
from prunetune.workers.record import CandidateRecord
from tests.faults import embedded_ray, worker_faults
from tests.runs import run_args

NO_IDLE_WORKERS = "RAY_prestart_worker_first_driver"  # Ray's setting: no idle workers when a driver connects


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The base-model cache of this module's runs: they share the base model's recipe, so it is trained once."""
    return tmp_path_factory.mktemp("cache")


def _assert_rays_messages_went_to_the_log(capfd, run):
    """Ray's report of the dead worker (Tune's `Trial task failed` and its traceback, the raylet's message) is in
    OUTPUT/ray.log; the terminal (file descriptors 1 and 2, where Ray's C++ core writes too) has none of it."""
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "Traceback" not in text and "Trial task failed" not in text and "(raylet)" not in text, text[-3000:]
    log = (run / "ray.log").read_text()
    assert "Trial task failed" in log and "Traceback" in log
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_that_dies_past_tunes_retries_gets_a_new_trial_and_a_failing_candidate_is_recorded(tmp_path, capfd,
                                                                                                   cache):
    """One search: candidate 2 raises (stored failed, the search goes on); candidate 3 kills its worker process
    (SIGKILL), and again in Tune's one retry (search.max_failures=1): the candidate gets one new trial, which
    evaluates it."""
    with embedded_ray(fail_at=2, crash_at=3, crashes=2, markers=tmp_path):
        assert main(run_args(tmp_path, "search.max_failures=1", cache=cache)) == 0
    assert (tmp_path / "crashed-3").exists() and (tmp_path / "crashed-3-2").exists()  # killed, then in the retry
    records = {r.index: r for r in CandidateStore(str(tmp_path / "run")).records()}
    assert sorted(records) == list(range(8))
    assert records[2].status == "failed" and records[2].error == "RuntimeError: injected failure"
    assert records[2].ratios and records[2].score is None
    assert all(records[i].ok for i in records if i != 2)
    out = _assert_rays_messages_went_to_the_log(capfd, tmp_path / "run")
    lost = [line for line in out.splitlines() if "[search] candidate 3: its trial was lost" in line]
    assert lost and all(len(line) < 300 for line in lost)  # prunetune's own line stays, short; Ray's is in ray.log


@pytest.mark.ray
def test_starting_ray_keeps_the_sigterm_handler_prunetune_set_and_prestarts_no_idle_workers():
    """ray.init installs its own SIGTERM handler (and its C++ core one that prints a stack dump): the embedded Ray
    of `prunetune run` puts prunetune's back, so SIGTERM stops the run as Ctrl-C does. Its raylet starts without
    the idle workers Tune's trial actors never use; the driver's own environment stays as it was."""
    import psutil

    from prunetune.search.cluster import start_embedded

    def prunetunes(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, prunetunes)
    had = os.environ.pop(NO_IDLE_WORKERS, None)
    try:
        start_embedded(num_cpus=1, include_dashboard=False, log_to_driver=False)
        assert signal.getsignal(signal.SIGTERM) is prunetunes
        raylets = [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
        assert len(raylets) == 1 and raylets[0].environ().get(NO_IDLE_WORKERS) == "0"
        assert NO_IDLE_WORKERS not in os.environ
    finally:
        if had is not None:
            os.environ[NO_IDLE_WORKERS] = had
        ray.shutdown()
        signal.signal(signal.SIGTERM, before)


class _Numbered:
    """A search algorithm for the searcher's bookkeeping: candidate i is [i / 10]."""

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
        return [index / 10]

    def observe(self, record) -> None:
        pass


def _indices(config: dict) -> list[int]:
    return [c.index for c in config["candidates"]]


def test_the_searcher_hands_a_lost_candidate_out_once_more_and_finishes_when_no_trial_runs(tmp_path):
    searcher = StrategySearcher(_Numbered(), "numbered", [], 2, CandidateStore(str(tmp_path)), concurrency=2)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert [_indices(first), _indices(second)] == [[0], [1]]
    assert searcher.suggest("c") is None  # every candidate handed out, two trials still running
    assert searcher.trial_ended("a", first["candidates"]) == []  # lost before it reported: handed out again
    assert searcher.suggest("c") == first
    assert searcher.trial_ended("c", first["candidates"]) == first["candidates"]  # lost again: its error is its result
    assert searcher.suggest("d") is None
    searcher.observe(CandidateRecord(1, [0.1], score=0.5, flops=1))
    assert searcher.trial_ended("b", []) == []
    assert searcher.suggest("d") == Searcher.FINISHED


def test_a_trial_evaluates_a_batch_and_only_what_it_had_not_reported_is_handed_out_again(tmp_path):
    searcher = StrategySearcher(_Numbered(), "numbered", [], 10, CandidateStore(str(tmp_path)), batch_size=4,
                                concurrency=2)
    # batches of 4 consecutive candidates, none larger than its slot's share of what is left (6 over 2 slots: 3)
    batches = [searcher.suggest(t)["candidates"] for t in "ab"]
    assert [[c.index for c in batch] for batch in batches] == [[0, 1, 2, 3], [4, 5, 6]]
    searcher.observe(CandidateRecord(0, [0.0], score=0.5, flops=1))
    assert searcher.trial_ended("a", batches[0][1:]) == []  # its worker died while it evaluated candidate 1
    assert _indices(searcher.suggest("c")) == [1, 2, 3]
    assert [_indices(searcher.suggest(t)) for t in "def"] == [[7], [8], [9]]  # the batch's rest, then the tail
    assert searcher.suggest("g") is None
    # search.max_failures=0: a lost trial's candidates are not handed out again
    once = StrategySearcher(_Numbered(), "numbered", [], 1, CandidateStore(str(tmp_path)), retry_lost=False)
    lost = once.suggest("a")["candidates"]
    assert once.trial_ended("a", lost) == lost and once.suggest("b") == Searcher.FINISHED


def test_the_ledger_says_each_lost_candidate_is_evaluated_again_and_stores_it_failed_when_lost_twice(tmp_path, capsys):
    RunDir(str(tmp_path)).create(load_config(None), overwrite=False)
    searcher = StrategySearcher(_Numbered(), "numbered", [], 2, CandidateStore(str(tmp_path)), batch_size=2)
    ledger = Ledger(str(tmp_path), 2, searcher)
    error = tmp_path / "error.txt"
    error.write_text("Traceback ...\nray.exceptions.ActorDiedError: The actor died unexpectedly. More text.\n")
    a = SimpleNamespace(trial_id="a", config=searcher.suggest("a"), error_file=str(error))
    ledger.on_trial_result(0, [], a, CandidateRecord(0, [0.0], score=0.5, flops=1).to_dict())
    ledger.on_trial_recover(0, [], a)  # Tune retries the trial itself
    searcher.on_trial_complete("a", error=True)  # Tune's notice to the searcher changes nothing, before or after
    ledger.on_trial_error(0, [], a)  # past Tune's retries: handed out again by the searcher
    b = SimpleNamespace(trial_id="b", config=searcher.suggest("b"), error_file=str(error))
    assert _indices(b.config) == [1]
    ledger.on_trial_error(0, [], b)  # lost again: its error is its result
    ledger.flush()
    lost = [ln for ln in capsys.readouterr().out.splitlines() if "its trial was lost" in ln]
    assert lost == ["[search] candidate 1: its trial was lost (ray.exceptions.ActorDiedError: The actor died "
                    "unexpectedly); evaluating it again"] * 2
    records = CandidateStore(str(tmp_path)).records()
    died = "ray.exceptions.ActorDiedError: The actor died unexpectedly. More text."
    assert [(r.index, r.status, r.error, r.trial_id) for r in records] == [(0, "ok", None, "a"),
                                                                           (1, "failed", died, "b")]
    assert searcher.suggest("c") == Searcher.FINISHED


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_where_every_candidate_fails_stops_early(tmp_path, capsys, cache):
    with embedded_ray(fail_at="all"):
        code = main(run_args(tmp_path, candidates=40, cache=cache))
    err = capsys.readouterr().err
    assert code == 1
    assert "search stopped:" in err and "candidates failed" in err and "injected failure" in err
    records = CandidateStore(str(tmp_path / "run")).records()
    assert 4 <= len(records) < 40 and all(r.status == "failed" for r in records)


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_node_mid_search_loses_no_candidate(tmp_path, cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env=worker_faults(delay_s=1.0))
        result = {}
        args = run_args(tmp_path, "search.max_failures=3", "search.max_concurrent_trials=4",
                        "resources.cpus_per_trial=1", candidates=12, cache=cache)
        driver = threading.Thread(target=lambda: result.setdefault("code", main(args)))
        driver.start()
        deadline = time.time() + 180
        while len(CandidateStore(str(tmp_path / "run")).indices()) < 3:
            assert time.time() < deadline and driver.is_alive()
            time.sleep(0.2)
        cluster.remove_node(nodes[0])
        driver.join(timeout=400)
        assert result.get("code") == 0
        records = CandidateStore(str(tmp_path / "run")).records()
        assert [r.index for r in records] == list(range(12)) and all(r.ok for r in records)
    finally:
        ray.shutdown()
        cluster.shutdown()
