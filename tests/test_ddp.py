"""Data-parallel finalists (finetune.workers_per_finalist=2): each finalist fine-tunes as a Ray Train TorchTrainer of
2 DDP workers (gloo on CPU) inside the Tune fine-tuning stage, and a killed run resumes it from its last epoch."""
import glob
import json

import pytest

from tests.faults import end_hung_workers
from tests.runs import as_args, small
from tests.stops import finish, kill, start, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _finalists(run) -> dict:
    """Tune's own record of the fine-tuning trials (its newest state file; a restore starts another): {rank: last
    result} of those that reported."""
    states = sorted(glob.glob(str(run / "tune" / "finetune" / "experiment_state-*.json")))
    try:
        trials = json.load(open(states[-1]))["trial_data"] if states else []
    except (OSError, ValueError):  # being rewritten
        return {}
    results = {}
    for _, metadata in trials:  # (trial, run metadata) as JSON strings
        last = json.loads(metadata).get("last_result") or {}
        if "rank" in last:
            results[last["rank"]] = last
    return results


def _epoch_1_checkpoint_recorded(run):
    return lambda: any(r["epoch"] == 1 and r.get("checkpoint_dir_name") for r in _finalists(run).values())


def test_a_finalist_fine_tunes_with_two_ddp_workers_and_resumes_after_a_kill(tmp_path):
    """The finalist's worker hangs at the end of epoch 2 (SIGSTOP, before reporting it) once Tune has its epoch-1
    checkpoint; the driver is killed there. The resume continues the finalist from epoch 1 (epoch 2 is its only
    epoch reported again) and it ends with 2 epochs trained by 2 workers. (One finalist: each TorchTrainer start
    costs ~4 processes, and a second finalist tests nothing a first does not.)"""
    run, log_path, markers = tmp_path / "run", tmp_path / "driver.log", tmp_path / "markers"
    markers.mkdir()
    args = ["run", *as_args(small(run, tmp_path / "cache", "ray.num_cpus=2", "finetune.workers_per_finalist=2",
                                  "finetune.epoch_timeout_s=600", candidates=4, top_k=1, epochs=2))]
    try:
        _interrupt_and_resume(run, log_path, markers, args)
    finally:
        end_hung_workers(str(markers))


def _interrupt_and_resume(run, log_path, markers, args):
    with open(log_path, "ab") as log:
        # 3 s before each epoch's report: Ray Train polls its workers every 2 s, so epoch 1 reaches Tune before the
        # hang stops a worker that the poll would then wait on
        proc = start(args, log, markers=markers, hang_epoch=2, delay_s=3)
        wait_for(_epoch_1_checkpoint_recorded(run), proc, 240, "Tune's record of an epoch-1 checkpoint")
        kill(proc)
    (rank, _), = ((r, m) for r, m in _finalists(run).items() if m["epoch"] == 1)
    finish(run, log_path, markers=markers)
    resumed = log_path.read_text().split("[finetune] restoring the Tune experiment")[1]
    assert f"[finetune] finalist {rank} " in resumed
    epochs = [line.split(" epoch ")[1].split(":")[0] for line in resumed.splitlines()
              if line.startswith(f"[finetune] finalist {rank} (")]
    assert epochs == ["2"], resumed[-3000:]  # resumed after its epoch-1 checkpoint, not started again
    final = json.load(open(run / "final" / "summary.json"))["final"]
    assert len(final) == 1 and final[0]["epochs"] == 2
    assert {r: (m["epoch"], m["workers"]) for r, m in _finalists(run).items()} == {1: (2, 2)}
