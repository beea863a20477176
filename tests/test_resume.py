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


def test_resume_after_sigkill_in_search_and_in_finetuning(tmp_path):
    run = tmp_path / "run"
    overrides = [f"output.dir={run}", f"output.cache_dir={tmp_path / 'cache'}", "model.pretrain_epochs=2",
                 "search.num_candidates=10", "search.top_k=2", "evaluation.calibration_batches=3",
                 "evaluation.batch_size=64", "evaluation.heldout_size=150", "finetune.epochs=3",
                 "finetune.scheduler=fifo", "ray.num_cpus=2"]
    args = ["run", *sum((["--set", o] for o in overrides), [])]
    evaluations = tmp_path / "evaluations.log"
    env = {**os.environ, "PRUNETUNE_FAULT_DELAY_S": "1.0", "PRUNETUNE_FAULT_LOG": str(evaluations),
           "RAY_DEDUP_LOGS": "0"}
    store = CandidateStore(str(run))
    with open(tmp_path / "driver.log", "ab") as log:
        proc = _start(args, env, log)
        _wait_for(lambda: os.path.isdir(store.path) and len(store.parts()) >= 3, proc, 180, "3 stored candidates")
        _kill(proc)
        stored_before = set(CandidateStore(str(run)).indices())
        assert 3 <= len(stored_before) < 10

        proc = _start(["resume", str(run)], env, log)  # killed again, this time while fine-tuning
        ckpt_root = run / "tune" / "finetune"
        _wait_for(lambda: ckpt_root.is_dir() and any(p.name.startswith("checkpoint_")
                                                     for p in ckpt_root.glob("rank*/checkpoint_*")),
                  proc, 240, "a fine-tuning checkpoint")
        _kill(proc)
        assert json.load(open(run / "manifest.json"))["stage"] == "finetune"

        proc = _start(["resume", str(run)], {**env, "PRUNETUNE_FAULT_DELAY_S": "0"}, log)
        assert proc.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    output = (tmp_path / "driver.log").read_text()
    assert "[finetune] restoring the Tune experiment" in output

    raw = pq.read_table(run / "candidates.parquet").column("index").to_pylist()
    assert sorted(raw) == list(range(10))  # each candidate exactly once
    counts = Counter(int(line) for line in evaluations.read_text().split())
    assert all(counts[i] == 1 for i in stored_before)  # nothing already stored was evaluated again
    assert set(counts) == set(range(10))
    summary = json.load(open(run / "final" / "summary.json"))
    assert len(summary["final"]) == 2 and all(f["epochs"] == 3 for f in summary["final"])
    assert not (run / "run.lock").exists()
