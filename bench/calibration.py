"""How much adaptive-BN calibration does a ranking need? Real CIFAR-10, no Ray: the calibration budget study.

    python bench/calibration.py --data /tmp/cifar10 [--checkpoint bench/checkpoints/resnet20-cifar10.pt]
        [--strategies 30] [--finetune-epochs 2] [--finetune-images 15000]

The same strategies (50% +- 1% FLOPs) are scored after recalibrating BN with 2, 5, 10, 20 and 50 batches of 128
(and other batch sizes, stopping early once the statistics converge, and bf16 autocast on the CPU). For each
setting: the Spearman correlation of its scores with the 50-batch scores and with the candidates' accuracy after
fine-tuning (bootstrap 95% interval), and the seconds per candidate (calibration and scoring), from which the
candidates per hour follow. Partial results are kept in bench/results/calibration.partial.json.
`--smoke`: 3 strategies of a random digits_cnn on tiny synthetic data, four small settings, 1 fine-tuning epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (CIFAR_SMOKE, cifar_arguments, cifar_model, median, parse_args,  # noqa: E402
                          results_path, save, table)
from prunetune import (CandidateEvaluator, FinetuneOptions, PruningSpace, StrategySampler, finetune,  # noqa: E402
                       load_config)
from prunetune.workers.evaluator import evaluation_data  # noqa: E402

# name -> (batches, batch size, convergence tolerance, amp); the first is the reference
SETTINGS = {"50 x 128 (reference)": (50, 128, None, "off"), "20 x 128": (20, 128, None, "off"),
            "10 x 128": (10, 128, None, "off"), "5 x 128": (5, 128, None, "off"), "2 x 128": (2, 128, None, "off"),
            "20 x 64": (20, 64, None, "off"), "5 x 256": (5, 256, None, "off"),
            "until converged (1%), at most 50 x 128": (50, 128, 0.01, "off"),
            "until converged (2%), at most 50 x 128": (50, 128, 0.02, "off"),
            "10 x 128, bf16 autocast": (10, 128, None, "bf16")}
SMOKE_SETTINGS = {"4 x 16 (reference)": (4, 16, None, "off"), "2 x 16": (2, 16, None, "off"),
                  "until converged (2%), at most 4 x 16": (4, 16, 0.02, "off"),
                  "2 x 16, bf16 autocast": (2, 16, None, "bf16")}
SMOKE = {**CIFAR_SMOKE, "strategies": 3, "heldout": 64, "finetune_epochs": 1, "finetune_images": 128}


def spearman(a, b) -> tuple[float, float, float]:
    """Spearman's rho with a bootstrap 95% interval (2,000 resamples)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a), np.asarray(b)
    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(2000):
        i = rng.integers(0, len(a), len(a))
        if len(set(i)) > 2:
            boot.append(spearmanr(a[i], b[i]).statistic)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return rho, float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cifar_arguments(parser)
    parser.add_argument("--strategies", type=int, default=30)
    parser.add_argument("--heldout", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=2, help="0: scores only")
    parser.add_argument("--finetune-images", type=int, default=15000)
    args = parse_args(parser, SMOKE, require=("data",))
    settings_table = SMOKE_SETTINGS if args.smoke else SETTINGS
    reference = next(iter(settings_table))
    partial_path = results_path("calibration.partial.json")
    data, model = cifar_model(args)
    space = PruningSpace.from_model(model, data.example_input())
    strategies = [StrategySampler(space, 0.5, 0.01, 0.7, seed=11).sample(i) for i in range(args.strategies)]
    settings = {"checkpoint": args.checkpoint, "heldout": args.heldout, "strategies": args.strategies}
    partial = json.load(open(partial_path)) if os.path.isfile(partial_path) else {}
    if partial.get("settings") != settings:
        partial = {"settings": settings, "scores": {}, "finetuned": {}}

    def keep() -> None:
        with open(partial_path, "w") as f:
            json.dump(partial, f)

    for name, (batches, size, tolerance, amp) in settings_table.items():
        if name in partial["scores"]:
            continue
        cfg = load_config(None, [f"evaluation.calibration_batches={batches}", f"evaluation.batch_size={size}",
                                 f"evaluation.heldout_size={args.heldout}", f"evaluation.amp={amp}",
                                 f"evaluation.calibration_tolerance={tolerance}"]).evaluation.settings()
        evaluator = CandidateEvaluator(model, space, evaluation_data(data, cfg), cfg, "cpu")
        evaluator.evaluate(strategies[0])  # warm-up
        rows = []
        for ratios in strategies:
            r = evaluator.evaluate(ratios)
            rows.append({"score": r.score, "seconds": r.t_prune + r.t_calibrate + r.t_score,
                         "calibrate_s": r.t_calibrate, "batches": r.calibration_batches})
        partial["scores"][name] = rows
        keep()
        print(f"{name}: median {median([r['seconds'] for r in rows]):.2f} s per candidate", flush=True)

    if args.finetune_epochs:
        batches, size = settings_table[reference][:2]
        cfg = load_config(None, [f"evaluation.heldout_size={args.heldout}", f"evaluation.calibration_batches={batches}",
                                 f"evaluation.batch_size={size}"])
        evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
        ft = load_config(None, [f"finetune.epochs={args.finetune_epochs}", "finetune.lr=0.01",
                                "finetune.batch_size=128", "finetune.warmup_epochs=0"]).finetune.settings()
        for i, ratios in enumerate(strategies):
            if str(i) in partial["finetuned"]:
                continue
            pruned = evaluator.prune(ratios)
            evaluator.recalibrate(pruned)
            subset = evaluator.rest_indices[: args.finetune_images]
            out = finetune(pruned, data, ft, FinetuneOptions(train_indices=subset))
            partial["finetuned"][str(i)] = out["test_accuracy"]
            keep()
            print(f"strategy {i}: fine-tuned test accuracy {out['test_accuracy']:.4f}", flush=True)

    reference_scores = [r["score"] for r in partial["scores"][reference]]
    finetuned = [partial["finetuned"].get(str(i)) for i in range(args.strategies)]
    base_seconds = median([r["seconds"] for r in partial["scores"][reference]])
    rows = []
    for name, scores in partial["scores"].items():
        s = [r["score"] for r in scores]
        seconds = median([r["seconds"] for r in scores])
        row = {"setting": name, "spearman_vs_50x128": spearman(s, reference_scores)[0],
               "median_batches": median([r["batches"] for r in scores]), "s_per_candidate": seconds,
               "candidates_per_hour": 3600 / seconds, "speedup": base_seconds / seconds}
        if all(f is not None for f in finetuned):
            rho, low, high = spearman(s, finetuned)
            row["spearman_vs_finetuned"] = f"{rho:.2f} [{low:.2f}, {high:.2f}]"
        rows.append(row)
    print(f"{args.model} on CIFAR-10, {args.strategies} strategies at 50% +- 1% FLOPs, {args.heldout} held-out "
          f"images; fine-tuned {args.finetune_epochs} epochs on {args.finetune_images} images; this machine's CPU")
    print(table(rows, list(rows[0])))
    print("saved", save("calibration", {"args": vars(args), "rows": rows, "scores": partial["scores"],
                                        "finetuned": finetuned}))


if __name__ == "__main__":
    main()
