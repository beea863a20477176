"""Fine-tuning recipes side by side on the CIFAR-10 ResNet-20 checkpoint at 50% FLOPs: the same candidates (the best
of --strategies random ones by adaptive-BN score), the same epochs and images, validation before epoch 1 and after
each, test accuracy of the last and of the kept (best-validation) epoch. No Ray.

    python bench/finetune_recipe.py --data /tmp/cifar10 --threads 1   (or --smoke)
"""
from __future__ import annotations

import argparse
import dataclasses
import io

from common import CIFAR_SMOKE, cifar_arguments, cifar_model, parse_args, save, table

# name -> finetune overrides; "before" is the recipe prunetune shipped until issue 23, "default" today's defaults
RECIPES = {"before: lr 0.05, 1 warm-up epoch": {"lr": 0.05, "warmup_epochs": 1.0, "distill_weight": 0.0},
           "lr 0.01, no warm-up": {"distill_weight": 0.0},
           "default: lr 0.01, no warm-up, distillation 0.5": {}}


def main() -> None:
    from prunetune import CandidateEvaluator, FinetuneOptions, PruningSpace, StrategySampler, finetune, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cifar_arguments(parser)
    parser.add_argument("--strategies", type=int, default=8, help="random strategies scored; the best are tuned")
    parser.add_argument("--finalists", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=10000, help="training images per epoch")
    args = parse_args(parser, {**CIFAR_SMOKE, "strategies": 3, "finalists": 1, "heldout": 64, "epochs": 1,
                               "images": 128}, require=("data",))
    data, model = cifar_model(args)
    space = PruningSpace.from_model(model, data.example_input())
    cfg = load_config(None, [f"evaluation.heldout_size={args.heldout}", "evaluation.calibration_batches=20",
                             "finetune.batch_size=128", f"finetune.epochs={args.epochs}"])
    evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
    sampler = StrategySampler(space, 0.5, 0.01, 0.7, seed=11)
    records = sorted((evaluator.evaluate(sampler.sample(i), i) for i in range(args.strategies)), key=lambda r: -r.score)
    rows = []
    for record in records[:args.finalists]:
        for name, overrides in RECIPES.items():
            pruned = evaluator.prune(record.ratios)
            evaluator.recalibrate(pruned)
            teacher = model if overrides.get("distill_weight") else None
            out = finetune(pruned.float(), data, dataclasses.replace(cfg.finetune.settings(), **overrides),
                           FinetuneOptions(train_indices=evaluator.rest_indices[:args.images],
                                           val_indices=evaluator.heldout_indices, teacher=teacher, log=io.StringIO()))
            history = out["history"]
            rows.append({"candidate": record.index, "recipe": name,
                         "val": [round(h["val_accuracy"], 4) for h in history],
                         "test": [round(h["test_accuracy"], 4) for h in history], "kept_epoch": out["best_epoch"],
                         "kept_test": out["best_test_accuracy"], "last_test": history[-1]["test_accuracy"],
                         "s_per_epoch": sum(h["epoch_seconds"] for h in history[1:]) / args.epochs})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    path = save("finetune_recipe", {"settings": vars(args), "recipes": RECIPES, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
