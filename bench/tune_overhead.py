"""Per-candidate overhead of the Ray Tune path against calling the evaluator in a plain loop, and
candidates/second with 1, 2 and 4 concurrent trial processes. Same model, data and candidates.

python bench/tune_overhead.py [--candidates 60] [--workers 1,2,4] [--num-cpus 2]
python bench/tune_overhead.py --smoke    # 4 candidates, one worker, tiny synthetic data; starts Ray
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import parse_args, save, smoke_dir, table  # noqa: E402
from prunetune import CandidateEvaluator, load_config  # noqa: E402
from prunetune.search.prepare import ensure_base, prepare  # noqa: E402
from prunetune.search.stages import run_search  # noqa: E402
from prunetune.search.rundir import RunDir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--candidates", type=int, default=60)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--num-cpus", type=int, default=2)
    args = parse_args(p, {"candidates": 4, "workers": "1"})
    tmp = smoke_dir() or tempfile.mkdtemp(prefix="tune-overhead-")
    overrides = {"search.num_candidates": args.candidates, "evaluation.calibration_batches": 10,
                 "evaluation.batch_size": 64, "evaluation.heldout_size": 300, "resources.cpus_per_trial": 0.5,
                 "output.cache_dir": f"{tmp}/cache", "model.pretrain_epochs": 5}
    if args.smoke:  # tiny synthetic data instead of the digits, a base model trained 1 epoch
        overrides.update({"data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
                          "data.train_size": 256, "data.test_size": 64, "evaluation.calibration_batches": 2,
                          "evaluation.heldout_size": 64, "model.pretrain_epochs": 1})
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    prep = ensure_base(prepare(cfg))
    torch.set_num_threads(1)  # a trial with cpus_per_trial=0.5 gets one thread too
    evaluator = CandidateEvaluator(prep.model, prep.space, prep.data, cfg.evaluation.settings(), "cpu",
                                   cfg.search.criterion)
    strategies = [prep.sampler.sample(i) for i in range(args.candidates)]
    evaluator.evaluate(strategies[0])
    start = time.perf_counter()
    for r in strategies:
        evaluator.evaluate(r)
    plain = (time.perf_counter() - start) / args.candidates

    import ray

    # always a new embedded Ray (as prunetune's own), never a cluster found through RAY_ADDRESS or a running one
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows = [{"path": "plain loop (1 process)", "workers": 1, "s_per_candidate": plain, "candidates_per_s": 1 / plain,
             "overhead_s": 0.0}]
    try:
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg.search.max_concurrent_trials = workers
            run = RunDir(os.path.join(tmp, f"run-{workers}"))
            run.create(cfg, overwrite=False)
            start = time.perf_counter()
            rows_stored = run_search(prep, run)
            wall = time.perf_counter() - start
            assert len(rows_stored) == args.candidates
            per = wall / args.candidates
            rows.append({"path": "Ray Tune trials", "workers": workers, "s_per_candidate": per,
                         "candidates_per_s": 1 / per, "overhead_s": per - plain / min(workers, args.num_cpus)})
    finally:
        ray.shutdown()
    print(f"{args.candidates} digits_cnn candidates, embedded Ray with {args.num_cpus} CPUs, 0.5 CPU per trial; "
          "Tune wall time includes worker start-up and evaluator set-up; overhead = Tune s/candidate - "
          "plain s/candidate / min(workers, CPUs)")
    print(table(rows, ["path", "workers", "s_per_candidate", "candidates_per_s", "overhead_s"]))
    print("saved", save("tune_overhead", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
