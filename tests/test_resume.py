"""Resume after the driver is killed with SIGKILL, in the search stage and in the fine-tuning stage."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq

from search.store import CandidateStore


def _start(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: the kill takes its embedded Ray too


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


def _overrides(run, cache):
    return [f"output.dir={run}", f"output.cache_dir={cache}", "model.pretrain_epochs=2", "search.num_candidates=10",
            "search.top_k=2", "evaluation.calibration_batches=3", "evaluation.batch_size=64",
            "evaluation.heldout_size=150", "finetune.epochs=3", "finetune.scheduler=fifo", "ray.num_cpus=2"]


def _run_args(run, cache):
    return ["run", *sum((["--set", o] for o in _overrides(run, cache)), [])]


def test_driver_killed_in_search_between_stages_and_in_finetuning(tmp_path):
    """SIGKILL the driver three times; the resumed result equals an uninterrupted run with the same seed."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    evaluations = tmp_path / "evaluations.log"
    env = {**os.environ, "PRUNETUNE_FAULT_DELAY_S": "1.0", "PRUNETUNE_FAULT_LOG": str(evaluations)}
    store = CandidateStore(str(run))
    manifest = run / "manifest.json"
    with open(tmp_path / "driver.log", "ab") as log:
        proc = _start(_run_args(reference, tmp_path / "cache"), dict(os.environ), log)
        assert proc.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]

        proc = _start(_run_args(run, tmp_path / "cache"), env, log)  # 1. killed during the search
        _wait_for(lambda: os.path.isdir(store.path) and len(store.parts()) >= 3, proc, 180, "3 stored candidates")
        _kill(proc)
        stored_before = set(CandidateStore(str(run)).indices())
        assert 3 <= len(stored_before) < 10

        between = {**env, "PRUNETUNE_FAULT_PAUSE_BETWEEN_STAGES_S": "60"}
        proc = _start(["resume", str(run)], between, log)  # 2. killed between the stages
        _wait_for(lambda: json.load(open(manifest))["stage"] == "finetune", proc, 240, "the end of the search")
        _kill(proc)
        assert not (run / "tune" / "finetune").exists()

        proc = _start(["resume", str(run)], env, log)  # 3. killed while fine-tuning
        ckpt_root = run / "tune" / "finetune"
        _wait_for(lambda: ckpt_root.is_dir() and any(ckpt_root.glob("rank*/checkpoint_*")), proc, 240,
                  "a fine-tuning checkpoint")
        _kill(proc)
        assert json.load(open(manifest))["stage"] == "finetune"

        proc = _start(["resume", str(run)], {**env, "PRUNETUNE_FAULT_DELAY_S": "0"}, log)
        assert proc.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    output = (tmp_path / "driver.log").read_text()
    assert "[finetune] restoring the Tune experiment" in output
    assert "View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:" in output or \
        "View the dashboard at http://127.0.0.1:" in output  # the embedded Ray binds it to localhost

    raw = pq.read_table(run / "candidates.parquet").column("index").to_pylist()
    assert sorted(raw) == list(range(10))  # each candidate exactly once
    counts = Counter(int(line) for line in evaluations.read_text().split())
    assert all(counts[i] == 1 for i in stored_before)  # nothing already stored was evaluated again
    assert set(counts) == set(range(10))
    assert not (run / "run.lock").exists()

    ours = {r["index"]: r for r in CandidateStore(str(run)).rows()}
    theirs = {r["index"]: r for r in CandidateStore(str(reference)).rows()}
    assert sorted(ours) == sorted(theirs)
    for i in ours:
        assert ours[i]["ratios"] == theirs[i]["ratios"] and ours[i]["flops"] == theirs[i]["flops"]
        assert abs(ours[i]["score"] - theirs[i]["score"]) < 1e-9 and abs(ours[i]["loss"] - theirs[i]["loss"]) < 1e-6
    final = json.load(open(run / "final" / "summary.json"))["final"]
    expected = json.load(open(reference / "final" / "summary.json"))["final"]
    assert [f["candidate"] for f in final] == [f["candidate"] for f in expected]
    assert all(f["epochs"] == 3 for f in final)
    for a, b in zip(final, expected):
        assert abs(a["val_accuracy"] - b["val_accuracy"]) < 1e-9 and abs(a["test_accuracy"] - b["test_accuracy"]) < 1e-9
