"""Sampler throughput and FLOPs accuracy on one core, against EagleEye's rejection sampling.

python bench/sampler.py [--samples 2000] [--target 0.5 --tolerance 0.01 --max-ratio 0.7]
python bench/sampler.py --smoke    # seconds: resnet20 and mobilenet_v1 at 16 px, 20 samples
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import bench_net, parse_args, save, table  # noqa: E402
from prunetune import PrunePlan, PruningSpace, StrategySampler  # noqa: E402
from prunetune.workers.space import count_flops  # noqa: E402

torch.set_num_threads(1)


def fvcore_flops(model, shape) -> int:
    return int(count_flops(model, torch.zeros(1, *shape)).total())


def rejection_rate(space, target, tol, max_ratio, draws, seed=0) -> tuple[float, float]:
    """EagleEye: ratios ~ U[0, max_ratio], keep those inside the band. (acceptance, valid per second)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    ratios = rng.uniform(0, max_ratio, (draws, len(space.groups)))
    flops = space.flops_of_kept(space.kept_batch(ratios)) / space.base_flops
    elapsed = time.perf_counter() - start
    accepted = int(np.sum(np.abs(flops - target) <= tol))
    return accepted / draws, accepted / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--max-ratio", type=float, default=0.7)
    p.add_argument("--fvcore-checks", type=int, default=5)
    p.add_argument("--rejection-draws", type=int, default=200_000, help="EagleEye's rejection sampling")
    p.add_argument("--models", default="resnet50:224,mobilenet_v1_224:224,resnet56:32", help="NAME:SIZE,...")
    args = parse_args(p, {"samples": 20, "fvcore_checks": 2, "rejection_draws": 2000,
                          "models": "resnet20:16,mobilenet_v1:16"})
    nets = {spec.split(":")[0]: bench_net(spec) for spec in args.models.split(",")}
    rows = []
    for name, (model, shape) in nets.items():
        space = PruningSpace.from_model(model, torch.zeros(1, *shape))
        sampler = StrategySampler(space, args.target, args.tolerance, args.max_ratio, seed=0)
        sampler.sample(0)
        start = time.perf_counter()
        strategies = [sampler.sample(i) for i in range(args.samples)]
        rate = args.samples / (time.perf_counter() - start)
        fractions = np.array([space.flops(r) / space.base_flops for r in strategies])
        start = time.perf_counter()
        for r in strategies[:200]:
            space.flops(r)
        flops_us = (time.perf_counter() - start) / 200 * 1e6
        plan = PrunePlan(model, space, "l1")
        errors = []
        for r in strategies[: args.fvcore_checks]:
            real = fvcore_flops(plan.apply(r), shape)
            errors.append(abs(space.flops(r) - real) / real)
        accept, rejection_valid_per_s = rejection_rate(space, args.target, args.tolerance, args.max_ratio,
                                                       args.rejection_draws)
        spread = np.array(strategies)
        rows.append({"model": name, "groups": len(space.groups), "valid_per_s": rate,
                     "flops_model_us": flops_us,
                     "band_misses": int(np.sum(np.abs(fractions - args.target) > args.tolerance)),
                     "max_abs_err_vs_target": float(np.abs(fractions - args.target).max()),
                     "max_rel_err_vs_fvcore": max(errors), "fvcore_checks": len(errors),
                     "eagleeye_acceptance": accept, "eagleeye_valid_per_s": rejection_valid_per_s,
                     "per_group_std": float(spread.std(0).mean()), "within_strategy_std": float(spread.std(1).mean())})
    print(f"sampler: target {args.target} +- {args.tolerance}, max_ratio {args.max_ratio}, {args.samples} samples, "
          "1 thread")
    print(table(rows, ["model", "groups", "valid_per_s", "flops_model_us", "band_misses", "max_rel_err_vs_fvcore",
                       "eagleeye_acceptance", "eagleeye_valid_per_s", "per_group_std", "within_strategy_std"]))
    print("saved", save(f"sampler-target{args.target}", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
