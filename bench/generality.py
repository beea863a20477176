"""Every torchvision (and a spread of timm) classification model through the preflight and one evaluation.

    python bench/generality.py [--timm all|NAMES] [--models NAMES] [--max-params-m 150]
    python bench/generality.py --models yolo:yolov8n,yolo:yolov8s,yolo:yolo11n,yolo:yolov8n-seg --image-size 640
    python bench/generality.py --smoke    # seconds: prunetune's digits_cnn and resnet20 (pt:NAME) at 16 px

Random weights, 224 px, 10 classes. For each model: the preflight (space; most pruned, first sampled and least
pruned strategy checked against fvcore and in function on the pruned network), one more random strategy checked
the same way, the fast pruner's time, and one CandidateEvaluator.evaluate on synthetic data. Prints
model | groups | left out | FLOPs error | params error | function error | prune ms | evaluates | refusal, and
saves JSON. The function error is the largest difference between a pruned network's output and the base's with
the removed channels zeroed at every conv and linear input, relative to the largest output (preflight.functional_gap).
Needs torchvision (and timm) that import beside the installed torch: the CPU wheel of torch does not take
PyPI's torchvision (see docs/getting-started.md); a torch 2.14.1 + torchvision 0.29.1 virtualenv runs it on a CPU.

`yolo:NAME` is Ultralytics' NAME.yaml (ultralytics installed beside; random init, its 80 classes, nothing
downloaded) with model.task yolo: the preflight proves its raw maps, and the evaluation scores mAP on a small
YOLO-format data set of tests/yolo_data.py's factory (48 + 16 images, 80 class names) at the image size. The
preflight runs on one torch thread (the rest on all cores); each row has its wall and process CPU time and the
process's peak resident memory after it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_args, results_path, save, table  # noqa: E402
from prunetune import (CandidateEvaluator, EvaluationSettings, PreflightOptions, PrunePlan, StrategySampler,  # noqa: E402
                       load_data, preflight)
from prunetune.workers.preflight import functional_gap  # noqa: E402
from prunetune.workers.space import count_flops  # noqa: E402
from prunetune.workers.tasks import CLASSIFICATION  # noqa: E402
from prunetune.workers.yolo import YOLO  # noqa: E402
from tests.yolo_data import write_yolo_dataset  # noqa: E402

YOLO_CLASSES = 80  # every Ultralytics YAML's default

# One or two of each timm family the issue tracker names (ResNeXt/SE, EfficientNet-lite, GhostNet, MixNet, ViT...).
TIMM_DEFAULT = ["resnet26d", "seresnext26d_32x4d", "efficientnet_lite0", "ghostnet_100", "mixnet_s",
                "vit_tiny_patch16_224", "convnext_atto", "regnetx_002", "mobilenetv3_small_100", "rexnet_100",
                "dla34", "hrnet_w18_small", "cspresnet50", "densenet121", "res2net50_14w_8s", "resnest14d",
                "tf_efficientnetv2_b0", "dpn68", "levit_128s", "mobilevit_xxs"]


def build(name: str):
    """A model with random weights from `tv:NAME`, `timm:NAME` or `pt:NAME` (prunetune's own), with 10 classes, or
    `yolo:NAME` (Ultralytics' NAME.yaml, with its 80)."""
    if name.startswith("yolo:"):
        from ultralytics import YOLO as Ultralytics

        return Ultralytics(f"{name[5:]}.yaml").model
    if name.startswith("pt:"):
        from prunetune import build_model

        return build_model(name[3:], num_classes=10, in_channels=3)
    if name.startswith("tv:"):
        import torchvision.models as tvm

        return tvm.get_model(name[3:], weights=None, num_classes=10)
    import timm

    return timm.create_model(name[5:], pretrained=False, num_classes=10)


def relative_error(space, pruned, ratios, x) -> tuple[float, float]:
    """|space - fvcore| / fvcore for FLOPs and params on the pruned network."""
    flops = count_flops(pruned, x).total()
    params = sum(p.numel() for p in pruned.parameters())
    return abs(space.flops(ratios) - flops) / flops, abs(space.params(ratios) - params) / params


def one(name: str, data, evaluation, max_params_m: float, image_size: int = 224) -> dict:
    """The whole check of one model; a refusal or failure is a row too."""
    row = {"model": name}
    try:
        model = build(name).eval()
    except Exception as e:
        return {**row, "refusal": f"does not build here: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    size = sum(p.numel() for p in model.parameters()) / 1e6
    if size > max_params_m:
        return {**row, "refusal": f"skipped: {size:.0f} M params (--max-params-m {max_params_m:g})"}
    x = torch.zeros(1, 3, image_size, image_size)
    task, classes = (YOLO, YOLO_CLASSES) if name.startswith("yolo:") else (CLASSIFICATION, 10)
    t, cpu = time.perf_counter(), time.process_time()

    def cost() -> dict:
        return {"preflight_s": time.perf_counter() - t, "preflight_cpu_s": time.process_time() - cpu,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    torch.set_num_threads(1)  # for its CPU time: a second thread's OpenMP spinning counts the machine's load into it
    try:
        first = lambda space: StrategySampler(space, 0.5, 0.02, 0.7).sample(0)  # noqa: E731
        verdict = preflight(model, x, PreflightOptions(classes, 0.7, first, task=task))
    except Exception as e:
        return {**row, "refusal": str(e).splitlines()[0], **cost()}
    space = verdict.space
    row.update(groups=len(space.groups), left_out=len(verdict.left_out), **cost())
    torch.set_num_threads(os.cpu_count() or 1)
    if verdict.left_out:
        row["left_out_why"] = sorted({reason for _, reason in verdict.left_out})
    plan = PrunePlan(model, space, "l1")
    strategies = [np.full(len(space.groups), 0.7), StrategySampler(space, 0.5, 0.02, 0.7).sample(0),
                  np.random.default_rng(0).uniform(0, 0.7, len(space.groups))]
    errors, gaps, times = [], [], []
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for ratios in strategies:
        t = time.perf_counter()
        pruned = plan.apply(ratios)
        times.append(time.perf_counter() - t)
        errors.append(relative_error(space, pruned, ratios, x))
        gaps.append(functional_gap(plan, ratios, pruned, noise))
    row.update(flops_error=max(e[0] for e in errors), params_error=max(e[1] for e in errors),
               function_error=max(gaps), prune_ms=1000 * median(times))
    try:
        record = CandidateEvaluator(model, space, data, evaluation, "cpu", task=task).evaluate(strategies[1])
        row["evaluates"] = f"yes ({record.t_prune + record.t_calibrate + record.t_score:.1f} s)"
    except Exception as e:
        row["evaluates"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated tv:NAME / timm:NAME / pt:NAME (default: all torchvision + "
                        "timm)")
    parser.add_argument("--timm", default="default", help="'all', 'none', 'default' or comma-separated names")
    parser.add_argument("--max-params-m", type=float, default=150.0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per model")
    parser.add_argument("--max-memory-gb", type=float, default=10.0, help="address space per model")
    parser.add_argument("--update", action="store_true", help="replace these models' rows in the saved results")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one model, print its row as JSON
    args = parse_args(parser, {"models": "pt:digits_cnn,pt:resnet20", "image_size": 16, "timeout_s": 120.0})
    warnings.filterwarnings("ignore")
    if args.one:
        torch.set_num_threads(os.cpu_count() or 1)
        if args.one.startswith("yolo:"):
            path = write_yolo_dataset(tempfile.mkdtemp(prefix="generality-yolo-"), 48, 16, YOLO_CLASSES)
            data = load_data("yolo", path, image_size=args.image_size)
        else:
            data = load_data("synthetic", image_size=args.image_size, num_classes=10, train_size=48, test_size=8)
        evaluation = EvaluationSettings(calibration_batches=2, batch_size=8, heldout_size=16, score_batch_size=16)
        print(json.dumps(one(args.one, data, evaluation, args.max_params_m, args.image_size)))
        return
    if args.models:
        names = args.models.split(",")
    else:
        import torchvision.models as tvm

        names = [f"tv:{n}" for n in tvm.list_models(module=tvm)]
        if args.timm != "none":
            import timm

            chosen = timm.list_models() if args.timm == "all" else \
                TIMM_DEFAULT if args.timm == "default" else args.timm.split(",")
            names += [f"timm:{n}" for n in chosen]
    limit = int(args.max_memory_gb * 2 ** 30)
    rows = []
    for name in names:  # one process per model: memory comes back, and a crash is one row
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--max-params-m", str(args.max_params_m),
                                   "--image-size", str(args.image_size)],
                                  capture_output=True, text=True, timeout=args.timeout_s,
                                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            rows.append(json.loads(last) if last.startswith("{") else
                        {"model": name, "refusal": f"crashed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]}"})
        except subprocess.TimeoutExpired:
            rows.append({"model": name, "refusal": f"timed out after {args.timeout_s:g} s"})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    if args.update:  # the rows of these models replace theirs in the saved results, in the saved order
        fresh = {r["model"]: r for r in rows}
        saved = json.load(open(results_path("generality.json")))["rows"]
        rows = [fresh.pop(r["model"], r) for r in saved] + list(fresh.values())
    columns = ["model", "groups", "left_out", "flops_error", "params_error", "function_error", "prune_ms",
               "preflight_cpu_s", "evaluates", "refusal"]
    print(table(rows, columns))
    exact = [r for r in rows if "flops_error" in r]
    print(f"\n{len(rows)} models: {len(exact)} accepted, "
          f"{sum(r['flops_error'] <= 1e-4 and r['params_error'] <= 1e-4 for r in exact)} of them exact to 1e-4 in "
          f"counts, {sum(r.get('function_error', 1) <= 1e-4 for r in exact)} in function; "
          f"{len(rows) - len(exact)} refused or skipped")
    if args.smoke and (len(exact) < len(rows) or not all(r["evaluates"].startswith("yes") and
                                                         r["function_error"] <= 1e-4 for r in exact)):
        raise SystemExit("smoke: every model should pass the preflight, compute what its base does, and evaluate")
    print("saved", save("generality", {"rows": rows}))


if __name__ == "__main__":
    main()
