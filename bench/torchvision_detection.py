"""torchvision detectors through prunetune (examples/torchvision_detection.py): each family checked and inspected,
one searched end to end with its own mAP.

    python bench/torchvision_detection.py [--families fcos,retinanet,ssd,ssdlite,rpn] [--search ssdlite]
    python bench/torchvision_detection.py --smoke    # SSDlite inspected and searched tiny; skips without torchvision

For each family (random weights, 2 classes, at the example's image_size_of(family) px): the adapter's loss against
the detector's own training-mode loss on the same batch (`loss_gap`), its post-processed boxes against the detector's
eval output (`boxes_gap`), and the preflight (`prunetune inspect`'s check): groups, groups left out, the convs left
whole, the space's FLOPs and params against fvcore's on the most pruned and a sampled pruned network (the largest
relative error), the function error (preflight's functional_gap) and its time, or the refusal in one line. Then one
family (--search) searched: `prunetune run` on the squares data (a base trained here, candidates scored by held-out
mAP@0.5:0.95 after adaptive BN, the top ones fine-tuned with the detector's loss): the base's and the final model's
test mAP, the candidates' scores, and the final model's FLOPs and params against fvcore's. Saves
results/torchvision_detection-inspect.json and results/torchvision_detection-search.json.
Needs torchvision that imports beside the installed torch (not the CPU wheel CI uses: a torch 2.14.1 + torchvision
0.29.1 virtualenv runs it on a CPU); without it, it says so and saves a skipped result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import parse_args, results_path, save, smoke_dir, table  # noqa: E402


def equivalence(tv, family: str, image_size: int) -> dict:
    """The adapter's loss and boxes against the detector's own forward (training loss, eval detections)."""
    train, _, classes = tv.data(4, 1, image_size)
    x, boxes = torch.stack([train[i][0] for i in range(4)]), [train[i][1] for i in range(4)]
    torch.manual_seed(0)
    model = tv.detector(family, classes)
    model.transform.min_size, model.transform.max_size = (image_size,), image_size  # no resize: the adapter's input
    model.transform.fixed_size = None
    raw, task = tv.RawHeads(family, model), tv.task(family, classes, image_size)
    tv._reference(family, classes)  # built before the seeds below (it draws random weights)
    targets = tv.targets_of(family, boxes, "cpu")
    model.train()
    if family == "rpn":  # the RPN samples anchors at random: the same draws on both sides
        images, prepared = model.transform(list(x), [dict(t) for t in targets])
        features = model.backbone(images.tensors)
        torch.manual_seed(1)
        _, losses = model.rpn(images, features, prepared)
    else:
        losses = model(list(x), [dict(t) for t in targets])
    own = float(sum(losses.values()))
    maps = raw(x)
    torch.manual_seed(1)
    ours = float(task.loss(maps, boxes))
    model.eval()
    with torch.no_grad():
        found = tv.Decoded(family, raw(x), classes, image_size).detections()
        if family == "rpn":
            images, _ = model.transform(list(x))
            theirs = model.rpn(images, model.backbone(images.tensors))[0]
        else:
            theirs = [d["boxes"] for d in model(list(x))]
    counts_equal = all(len(a) == len(b[0]) for a, b in zip(theirs, found))
    gap = max((float((a - b[0]).abs().max()) for a, b in zip(theirs, found) if len(a)), default=0.0)
    return {"loss": own, "loss_gap": abs(own - ours), "detections": sum(len(a) for a in theirs),
            "boxes_gap": gap if counts_equal else float("inf")}


def inspect(tv, family: str, image_size: int) -> dict:
    """The preflight of the family's RawHeads model with its task, and FLOPs/params against fvcore's."""
    from prunetune import PreflightOptions, PrunePlan, StrategySampler, preflight
    from prunetune.workers.preflight import functional_gap
    from prunetune.workers.space import count_flops

    torch.manual_seed(0)
    model = tv.raw_heads(family).eval()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    row = {"family": family, "base_flops": int(count_flops(model, x).total()),
           "base_params": sum(p.numel() for p in model.parameters())}
    t = time.perf_counter()
    try:
        first = lambda space: StrategySampler(space, 0.5, 0.02, 0.7).sample(0)  # noqa: E731
        verdict = preflight(model, x, PreflightOptions(tv.CLASSES, 0.7, first, task=tv.task(family,
                                                                                              image_size=image_size)))
    except Exception as e:
        return {**row, "refusal": str(e).splitlines()[0][:300], "preflight_s": time.perf_counter() - t}
    space = verdict.space
    row.update(groups=len(space.groups), left_out=len(verdict.left_out), preflight_s=time.perf_counter() - t,
               left_out_why=[f"{name}: {why}" for name, why in verdict.left_out])
    plan = PrunePlan(model, space, "l1")
    errors, gaps = [], []
    for ratios in (np.full(len(space.groups), 0.7), StrategySampler(space, 0.5, 0.02, 0.7).sample(1)):
        pruned = plan.apply(ratios)
        flops, params = count_flops(pruned, x).total(), sum(p.numel() for p in pruned.parameters())
        errors.append(max(abs(space.flops(ratios) - flops) / flops, abs(space.params(ratios) - params) / params))
        gaps.append(functional_gap(plan, ratios, pruned, x))
    narrowed = {m.module for g in space.groups for m in g.members if m.role == "out"}
    whole = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and name not in narrowed]
    row.update(count_error=max(errors), function_error=max(gaps), whole_convs=len(whole),
               whole_head_convs=[n for n in whole if n.startswith("head.")])
    return row


def search(family: str, out: str, image_size: int, smoke: bool) -> dict:
    """`prunetune run` of the family's RawHeads with its task on the squares data; the figures of its run folder."""
    from examples import torchvision_detection as tv
    from prunetune import load_pruned
    from prunetune.search.cli import main
    from prunetune.search.store import CandidateStore
    from prunetune.workers.space import count_flops

    run = os.path.join(out, f"run-{family}")
    config = {"model": {"name": "examples.torchvision_detection:raw_heads", "kwargs": {"family": family},
                        "task": f"examples.torchvision_detection:{family}_task",
                        "pretrain_epochs": 1 if smoke else 6, "pretrain_lr": 0.02},
              "data": {"name": "examples.torchvision_detection:data",
                       "kwargs": {"train_size": 48 if smoke else 320, "test_size": 16 if smoke else 64,
                                  "image_size": image_size}},
              "search": {"constraint": "flops", "target": 0.5, "algorithm": "random",
                         "num_candidates": 2 if smoke else 6, "top_k": 1 if smoke else 2, "batch_size": 2},
              "evaluation": {"heldout_size": 16 if smoke else 64, "batch_size": 16, "calibration_batches": 2 if smoke
                             else 4},
              "finetune": {"epochs": 1, "scheduler": "fifo", "batch_size": 16, "lr": 0.01},
              "output": {"dir": run, "cache_dir": os.path.join(out, "cache")}}
    path = os.path.join(out, f"{family}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    # the trials import examples.torchvision_detection too: from the repository root, as `PYTHONPATH=. prunetune run`
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    t = time.perf_counter()
    code = main(["run", path])
    wall = time.perf_counter() - t
    if code != 0:
        return {"family": family, "refusal": f"prunetune run exited {code}", "wall_s": wall}
    summary = json.load(open(os.path.join(run, "final", "summary.json")))
    records = CandidateStore(run).records()
    final = summary["final"][0]
    model, _, figures = load_pruned(os.path.join(run, "final", "rank1.pt"))
    x = torch.zeros(1, 3, image_size, image_size)
    return {"family": family, "wall_s": wall, "config": config, "base": summary.get("base"),
            "candidates": [{"score": r.score, "metrics": r.metrics, "flops": r.flops} for r in records],
            "final": final, "fvcore_flops": int(count_flops(model, x).total()),
            "fvcore_params": sum(p.numel() for p in model.parameters()),
            "figures": figures.__dict__ if figures is not None else None, "image_size": image_size,
            "classes": tv.CLASSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(("fcos", "retinanet", "ssd", "ssdlite", "rpn")),
                        help="inspected ('' for none)")
    parser.add_argument("--search", default="ssdlite", help="the family searched end to end ('' for none)")
    parser.add_argument("--update", action="store_true", help="replace these families' rows in the saved results")
    parser.add_argument("--image-size", type=int, help="of the inspection (default: the example's image_size_of; "
                        "the search runs at that default)")
    args = parse_args(parser, {"families": "ssdlite"})
    warnings.filterwarnings("ignore")
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # not installed, or built for another torch (the CPU wheel CI uses)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"skipped: torchvision does not import here ({reason})")
        print("saved", save("torchvision_detection-inspect", {"skipped": reason}))
        return
    from examples import torchvision_detection as tv

    rows = []
    for family in filter(None, args.families.split(",")):
        size = args.image_size or tv.image_size_of(family)
        row = {**inspect(tv, family, size), "image_size": size, **equivalence(tv, family, size)}
        rows.append(row)
        print(table([row], list(row)), flush=True)
    if rows and args.update:  # these families' rows replace theirs in the saved results, in the saved order
        fresh = {r["family"]: r for r in rows}
        saved = json.load(open(results_path("torchvision_detection-inspect.json")))["rows"]
        rows = [fresh.pop(r["family"], r) for r in saved] + list(fresh.values())
    if rows:
        columns = ["family", "image_size", "base_flops", "base_params", "groups", "left_out", "whole_convs",
                   "count_error", "function_error", "preflight_s", "loss_gap", "boxes_gap", "detections", "refusal"]
        print(table(rows, columns))
        print("saved", save("torchvision_detection-inspect", {"args": vars(args), "rows": rows}))
    if args.search:
        out = smoke_dir() or tempfile.mkdtemp(prefix="prunetune-tvdet-")
        found = search(args.search, out, tv.image_size_of(args.search), args.smoke)
        print(json.dumps({k: v for k, v in found.items() if k != "config"}, indent=1, default=str))
        print("saved", save("torchvision_detection-search", {"args": vars(args), **found}))


if __name__ == "__main__":
    main()
