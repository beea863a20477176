"""How well does the latency table predict, in each runtime, and does a latency budget buy faster models than FLOPs?

    python bench/latency.py [--models resnet56:32:32,mobilenet_v1_224:224:1] [--strategies 20] [--threads 1]
                            [--runtime torch,onnxruntime,openvino]
    python bench/latency.py --compare --data /tmp/cifar10 --checkpoint bench/checkpoints/resnet20-cifar10.pt

Prediction, per runtime and model (NAME:SIZE:BATCH; random weights: latency does not depend on them): the latency
table is built on this CPU in that runtime (the batch, the given threads), then `--strategies` strategies drawn by
the FLOPs sampler at targets spread over 30-80% are pruned and timed whole in the same runtime, with the base, in
interleaved rounds (the median of the rounds' medians, as the table's own figures): the median and worst
|predicted - timed| / timed (and its signed mean: drift of the machine's speed since the table was built shows as
a bias); the same for the fraction of the base's latency (what budgets are written in); and how much the same
networks' timings move when timed a second time (the noise floor no prediction can beat). The network nearest 50%
of the FLOPs is then timed beside the base with four times the passes: its measured speed-up against its FLOPs
ratio's (1 / FLOPs fraction) and the table's. Each runtime's results go to bench/results/latency-RUNTIME.json,
with the machine's load (1, 5 and 15 minutes, as uptime gives it) at the end and each model's 1-minute load
before and after it.

Comparison (`--compare`): on a trained model, two searches of the same size at the same latency budget, one
with `search.constraint: latency`, one with FLOPs at the same fraction (the usual stand-in), each candidate
scored with adaptive BN (no Ray); the best-scored model of each and the base are timed side by side, interleaved.

`--smoke`: both, in seconds: the prediction on digits_cnn at 16 px, batch 2 (3 strategies; eager torch and ONNX
Runtime), then the comparison on a random digits_cnn and tiny synthetic data (3 candidates per search, the budget
halfway between the most pruned network's predicted latency and the base's, as a tiny network's table moves with
the machine's load).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (CHECKPOINT, CIFAR_SMOKE, bench_net, cifar_model, median, parse_args, save,  # noqa: E402
                          table, time_side_by_side)
from prunetune import CandidateEvaluator, PruningSpace, StrategySampler, load_config  # noqa: E402
from prunetune.workers.constraints import CONSTRAINTS  # noqa: E402
from prunetune.workers.latency import build_table, interleaved_ms  # noqa: E402
from prunetune.workers.timing import RUNTIMES  # noqa: E402
from prunetune.workers.prune import PrunePlan  # noqa: E402


def prediction(spec: str, strategies: int, threads: int, runtime: str = "torch") -> dict:
    """Build the table of one model (NAME:SIZE:BATCH) in `runtime` (channels rounded as a latency search there rounds
    them), compare its predictions with whole networks timed there in interleaved rounds, and time the chosen
    network (the one nearest 50% of the FLOPs) beside the base: its measured speed-up against its FLOPs ratio."""
    name, size, batch = spec.split(":")
    torch.manual_seed(0)
    model, shape = bench_net(f"{name}:{size}")
    model.eval()
    example = torch.zeros(int(batch), *shape)
    round_to = RUNTIMES[runtime].channel_block  # what a latency search in it keeps (search.round_to's default)
    space = PruningSpace.from_model(model, example[:1], round_to=round_to)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    lut = space.latency = build_table(model, space, example, threads=threads, runtime=runtime)
    build_s = time.perf_counter() - start
    plan = PrunePlan(model, space)
    drawn = np.array([StrategySampler(space, 0.3 + 0.5 * (i % 11) / 10, 0.02, 0.7, seed=i).sample(0)
                      for i in range(strategies)])
    runs = [(net, example) for net in [model] + [plan.apply(ratios) for ratios in drawn]]
    timed, again = (np.array(interleaved_ms(runs, lut.repeats, threads, runtime)) for _ in range(2))
    predicted = lut.predict(space, space.kept_batch(drawn))
    base_predicted = float(lut.predict(space, space.kept_batch(np.zeros((1, len(space.groups)))))[0])
    flops = np.array([space.flops(ratios) / space.base_flops for ratios in drawn])
    errors = np.abs(predicted - timed[1:]) / timed[1:]
    fractions = timed[1:] / timed[0]  # the base timed in the same rounds: drift cancels
    fraction_errors = np.abs(predicted / base_predicted - fractions) / fractions
    retest = np.abs(again - timed)[1:] / timed[1:]  # the same networks timed again: the noise floor of a prediction
    chosen = int(np.argmin(np.abs(flops - 0.5)))
    base_ms, chosen_ms = interleaved_ms([runs[0], runs[1 + chosen]], 4 * lut.repeats, threads, runtime)
    rows = [{"flops_ratio": float(f), "predicted_ms": float(p), "timed_ms": float(t), "retimed_ms": float(a),
             "predicted_fraction": float(p) / base_predicted, "timed_fraction": float(fr)}
            for f, p, t, a, fr in zip(flops, predicted, timed[1:], again[1:], fractions)]
    return {"model": f"{name} ({size} px)", "runtime": runtime, "batch": int(batch), "round_to": round_to,
            "groups": len(space.groups),
            "layers": len(lut.layers), "fit_worst_error": round(lut.worst_error, 4), "table_s": round(build_s, 1),
            "base_ms": round(float(timed[0]), 3), "median_error": round(median(errors), 4),
            "worst_error": round(float(errors.max()), 4),
            "signed_mean_error": round(float(np.mean((predicted - timed[1:]) / timed[1:])), 4),
            "fraction_median_error": round(median(fraction_errors), 4),
            "fraction_worst_error": round(float(fraction_errors.max()), 4), "retest_median": round(median(retest), 4),
            "retest_worst": round(float(retest.max()), 4), "chosen_flops_ratio": round(float(flops[chosen]), 3),
            "speedup": round(base_ms / chosen_ms, 3), "flops_speedup": round(1 / float(flops[chosen]), 3),
            "predicted_speedup": round(base_predicted / float(predicted[chosen]), 3),
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)], "strategies": rows}


def compare(args) -> dict:
    """Latency-budget search vs FLOPs-budget search at the same fraction, best models timed side by side."""
    cfg = load_config(None, [f"evaluation.calibration_batches={args.calibration_batches}",
                             f"evaluation.heldout_size={args.heldout}"])
    data, model = cifar_model(args)
    space = PruningSpace.from_model(model, data.example_input())
    space.latency = build_table(model, space, space.example_input(1), threads=args.threads)
    if args.smoke:  # a tiny network's table moves with the machine's load: aim at the middle of what it reaches
        most_pruned = space.kept_batch(np.full((1, len(space.groups)), 0.7))
        args.budget = round((1 + float(CONSTRAINTS["latency"].fraction(space, most_pruned)[0])) / 2, 3)
    evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
    found = {}
    for constraint in ("latency", "flops"):
        sampler = StrategySampler(space, args.budget, 0.02, 0.7, seed=0, constraint=CONSTRAINTS[constraint])
        records = [evaluator.evaluate(sampler.sample(i), i) for i in range(args.candidates)]
        top = max(records, key=lambda r: r.score)
        found[constraint] = {"best_score": top.score, "ratios": top.ratios, "flops_ratio": top.flops_ratio,
                             "predicted_ms": top.latency_predicted_ms,
                             "timed_in_search_ms": [r.latency_ms for r in records]}
    nets = {"base": model, **{c: evaluator.prune(found[c]["ratios"]) for c in found}}
    timed = time_side_by_side(nets, space.example_input(1), args.threads)
    base_ms = timed["base"]
    for c in found:
        found[c]["timed_ms"] = timed[c]
        found[c]["latency_ratio"] = found[c]["timed_ms"] / base_ms
    return {"budget": args.budget, "candidates": args.candidates, "base_ms": base_ms, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56:32:32,mobilenet_v1_224:224:1", help="NAME:SIZE:BATCH,...")
    parser.add_argument("--strategies", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="torch", help=f"one or more of {', '.join(RUNTIMES)}, comma-separated")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--data", help="CIFAR-10 image folder (--compare)")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="trained state dict (--compare)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=2000)
    args = parse_args(parser, {**CIFAR_SMOKE, "models": "digits_cnn:16:2", "strategies": 3, "candidates": 3,
                               "calibration_batches": 2, "heldout": 64, "runtime": "torch,onnxruntime"})
    if args.compare and not args.data and not args.smoke:
        parser.error("--compare needs --data (the CIFAR-10 image folder)")
    runtimes = args.runtime.split(",")
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            parser.error(f"--runtime: {runtime} is not one of {', '.join(RUNTIMES)}")
        if RUNTIMES[runtime].package and importlib.util.find_spec(runtime) is None:
            parser.error(f"--runtime: {runtime} is not installed; install {RUNTIMES[runtime].package}")
    torch.set_num_threads(args.threads)
    if args.compare:
        return report_comparison(args)
    for runtime in runtimes:
        results = []
        for spec in args.models.split(","):
            results.append(prediction(spec, args.strategies, args.threads, runtime))
            print(table(results[-1:], COLUMNS), flush=True)
        print(table(results, COLUMNS))
        print("saved", save(f"latency-{runtime}", {"threads": args.threads, "strategies": args.strategies,
                                                   "runtime": runtime, "version": RUNTIMES[runtime].version(),
                                                   "results": results}))
    if args.smoke:
        report_comparison(args)

COLUMNS = ["model", "runtime", "batch", "groups", "layers", "table_s", "base_ms", "fit_worst_error", "median_error",
           "worst_error", "signed_mean_error", "fraction_median_error", "fraction_worst_error", "retest_median",
           "retest_worst", "chosen_flops_ratio", "speedup", "flops_speedup", "predicted_speedup", "load_1min"]


def report_comparison(args) -> None:
    """Run the comparison, print its table and save it."""
    result = compare(args)
    print(table([{"search": c, **{k: v for k, v in result[c].items() if k not in ("ratios", "timed_in_search_ms")}}
                 for c in ("latency", "flops")],
                ["search", "best_score", "flops_ratio", "predicted_ms", "timed_ms", "latency_ratio"]))
    print(f"base {result['base_ms']:.3f} ms (timed beside them); budget {result['budget']} of the base")
    print("saved", save(f"latency-compare-{args.budget:g}", result))


if __name__ == "__main__":
    main()
