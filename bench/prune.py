"""The pruning fast path (PrunePlan.apply) against a full Torch-Pruning pass, one core, same strategies.

python bench/prune.py [--models resnet50:224,resnet56:32,mobilenet_v1_224:224] [--candidates 10]
python bench/prune.py --smoke    # seconds: resnet20 and mobilenet_v1 at 16 px, 2 strategies
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import bench_net, median, parse_args, save, table  # noqa: E402
from prunetune import PrunePlan, PruningSpace, StrategySampler  # noqa: E402
from tests.archs import randomize_batchnorm  # noqa: E402
from tests.reference import metapruner  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--models", default="resnet50:224,resnet56:32,mobilenet_v1_224:224", help="NAME:SIZE,...")
    args = parse_args(p, {"models": "resnet20:16,mobilenet_v1:16", "candidates": 2})
    rows = []
    for spec in args.models.split(","):
        name = spec.split(":")[0]
        model, shape = bench_net(spec)
        model = randomize_batchnorm(model).eval()
        space = PruningSpace.from_model(model, torch.zeros(1, *shape))
        start = time.perf_counter()
        plan = PrunePlan(model, space, "l1")
        plan_s = time.perf_counter() - start
        sampler = StrategySampler(space, 0.5, 0.01, 0.7)
        fast, full = [], []
        for i in range(args.candidates + 1):
            r = sampler.sample(i)
            t = time.perf_counter()
            plan.apply(r)
            t_fast = time.perf_counter() - t
            t = time.perf_counter()
            metapruner(model, space, plan, r)
            t_full = time.perf_counter() - t
            if i:  # the first is a warm-up
                fast.append(t_fast)
                full.append(t_full)
        rows.append({"model": name, "plan_once_s": plan_s, "fast_median_ms": 1000 * median(fast),
                     "torch_pruning_median_ms": 1000 * median(full), "speedup": median(full) / median(fast)})
    print(f"pruning one candidate, 1 thread, {args.candidates} strategies at 50% FLOPs (+1 warm-up)")
    print(table(rows, ["model", "plan_once_s", "fast_median_ms", "torch_pruning_median_ms", "speedup"]))
    print("saved", save("prune", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
