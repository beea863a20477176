"""YOLOv8n from a prunetune search to Ultralytics: search, `export --format ultralytics`, YOLO(path), val, train, ONNX.

    python bench/yolo_chain.py [--image-size 64] [--candidates 6] [--pretrain-epochs 3]   # in a virtualenv with
    python bench/yolo_chain.py --smoke                                                     # ultralytics (below)

The chain: a small YOLO-format data set from tests/yolo_data.py's factory (noise images with coloured squares, 3
classes); `prunetune run` of YOLOv8n built from Ultralytics' yolov8n.yaml (random init: no weights are downloaded;
`model.name: ultralytics.nn.tasks:DetectionModel`, `model.task: yolo`), its base trained and its top candidate
fine-tuned with Ultralytics' loss; `prunetune export RUN --format ultralytics`; then in Ultralytics: `YOLO(path)`
loads the pruned network (its parameters and conv widths are the run's, its output the pruned model's), `.val` on
the data set's YAML, `.train` for an epoch with `prunetune.yolo.PrunedDetectionTrainer` (which keeps the pruned
widths) and with Ultralytics' own trainer (which rebuilds the network from its YAML: the row says at what size), and
`.export(format="onnx")`, whose output ONNX Runtime computes as the trained network does. Prints a table and saves
bench/results/yolo_chain.json.

Needs ultralytics (`pip install -e '.[yolo]'`) with a torch that torchvision imports beside (PyPI's torch 2.14.1 +
torchvision 0.29.1, run on the CPU) and onnx, onnxruntime, onnxslim (Ultralytics' ONNX export); where ultralytics
does not import (CI's CPU torch) it says why and, in --smoke, writes only that.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import parse_args, save, smoke_dir, table  # noqa: E402
from prunetune import load_pruned  # noqa: E402
from prunetune.search.cli import main as prunetune  # noqa: E402
from prunetune.workers.yolo import ultralytics_missing  # noqa: E402
from tests.yolo_data import write_yolo_dataset  # noqa: E402


def run_config(root: str, data_yaml: str, args) -> str:
    """The run's config file (YOLOv8n of 3 classes from yolov8n.yaml, the data set at args.image_size)."""
    config = {
        "model": {"name": "ultralytics.nn.tasks:DetectionModel", "task": "yolo",
                  "pretrain_epochs": args.pretrain_epochs, "pretrain_lr": 0.01,  # Ultralytics' lr0
                  "kwargs": {"cfg": "yolov8n.yaml", "nc": 3, "verbose": False}},
        "data": {"name": "yolo", "path": data_yaml, "image_size": args.image_size},
        "search": {"target": 0.5, "num_candidates": args.candidates, "top_k": 1, "algorithm": "random"},
        "evaluation": {"heldout_size": 16, "batch_size": 8, "calibration_batches": 2},
        "finetune": {"epochs": args.finetune_epochs, "scheduler": "fifo"},
        "output": {"dir": os.path.join(root, "run"), "cache_dir": os.path.join(root, "cache")},
    }
    path = os.path.join(root, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def widths(model: torch.nn.Module) -> list[int]:
    """Every conv's output channel count, in module order."""
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def params(model: torch.nn.Module) -> int:
    """The parameter count (as fvcore and the run count it)."""
    return sum(p.numel() for p in model.parameters())


def chain(args, root: str) -> tuple[list[dict], dict]:
    """Run every step; the table's rows and the figures."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from prunetune.yolo import PrunedDetectionTrainer

    rows, figures = [], {}

    def step(name: str, started: float, result: str) -> None:
        rows.append({"step": name, "seconds": round(time.perf_counter() - started, 1), "result": result})
        print(table(rows[-1:], list(rows[-1])), flush=True)

    t = time.perf_counter()
    data_yaml = write_yolo_dataset(os.path.join(root, "data"), train=args.train_images, val=args.val_images)
    step("data", t, f"{args.train_images} train + {args.val_images} val images, 3 classes, {args.image_size} px")

    t = time.perf_counter()
    config = run_config(root, data_yaml, args)
    if prunetune(["run", config]) != 0:
        raise SystemExit("prunetune run failed")
    pruned, record, scores = load_pruned(os.path.join(root, "run", "final", "rank1.pt"), raw_input=False)
    assert scores is not None
    figures["run"] = {"flops_ratio": scores.flops_ratio, "params": scores.params,
                      "test_map50_95": scores.test, "candidates": args.candidates, "epochs": scores.epochs}
    step("prunetune run", t, f"rank 1: {100 * scores.flops_ratio:.1f}% of the FLOPs, {scores.params:,} params, "
                             f"test mAP50-95 {scores.test:.4f}")

    t = time.perf_counter()
    if prunetune(["export", os.path.join(root, "run"), "--format", "ultralytics"]) != 0:
        raise SystemExit("prunetune export --format ultralytics failed")
    path = os.path.join(root, "run", "final", "rank1.ultralytics.pt")
    step("export --format ultralytics", t, f"{os.path.getsize(path) / 1e6:.1f} MB")

    t = time.perf_counter()
    yolo = YOLO(path)
    x = torch.rand(2, 3, args.image_size, args.image_size)
    with torch.no_grad():
        gap = float((yolo.model.eval()(x)[0] - pruned.eval()(x)[0]).abs().max())
    base = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    loaded = {"params": params(yolo.model), "widths_equal": widths(yolo.model) == widths(pruned),
              "output_gap": gap, "base_params": params(base), "task": yolo.task}
    figures["loaded"] = loaded
    assert loaded["params"] == record.params and loaded["widths_equal"] and gap < 1e-4, loaded
    step("YOLO(path)", t, f"{loaded['params']:,} params (base {loaded['base_params']:,}), conv widths the run's, "
                          f"output gap {gap:.1e}")

    t = time.perf_counter()
    common = {"imgsz": args.image_size, "batch": 8, "device": "cpu", "workers": 0, "plots": False, "project": root}
    metrics = yolo.val(data=data_yaml, name="val", **common)
    figures["val"] = {"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50)}
    step(".val(data)", t, f"mAP50-95 {metrics.box.map:.4f}, mAP50 {metrics.box.map50:.4f} (val split)")

    t = time.perf_counter()
    yolo.train(data=data_yaml, epochs=1, name="train", trainer=PrunedDetectionTrainer, amp=False, **common)
    trained = {"params": params(yolo.model), "widths_equal": widths(yolo.model) == widths(pruned)}
    assert trained["params"] == record.params and trained["widths_equal"], trained
    step(".train(trainer=PrunedDetectionTrainer)", t, f"1 epoch, {trained['params']:,} params: the pruned widths kept")

    t = time.perf_counter()
    plain = YOLO(path)
    plain.train(data=data_yaml, epochs=1, name="plain", amp=False, **common)
    trained["plain_trainer_params"] = params(plain.model)
    figures["train"] = trained
    step(".train() (Ultralytics' own trainer)", t, f"1 epoch, {trained['plain_trainer_params']:,} params: rebuilt "
                                                   "from the YAML, the weights that fit copied in")

    t = time.perf_counter()
    import onnxruntime

    onnx_path = yolo.export(format="onnx", imgsz=args.image_size, device="cpu")
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    image = torch.rand(1, 3, args.image_size, args.image_size)
    with torch.no_grad():
        want = yolo.model.float().eval()(image)[0].numpy()
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    onnx_gap = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-9))
    figures["onnx"] = {"size_mb": round(os.path.getsize(onnx_path) / 1e6, 2), "relative_gap": onnx_gap,
                       "output_shape": list(got.shape)}
    assert onnx_gap < 1e-3, figures["onnx"]
    step('.export(format="onnx")', t, f"{figures['onnx']['size_mb']} MB, output {list(got.shape)}, ONNX Runtime vs "
                                      f"torch {onnx_gap:.1e} (relative)")
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parse_args(parser, {"train_images": 32, "val_images": 8, "candidates": 2, "pretrain_epochs": 1})
    os.environ["YOLO_OFFLINE"] = "1"  # no update checks or downloads (read when ultralytics is first imported)
    missing = ultralytics_missing()
    if missing:
        print(f"skipped: {missing}")
        if args.smoke:
            print("saved", save("yolo_chain", {"skipped": missing}))
            return
        raise SystemExit(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix="yolo-chain-", dir=smoke_dir())
    rows, figures = chain(args, root)
    print(table(rows, ["step", "seconds", "result"]))
    print("saved", save("yolo_chain", {"args": {k: v for k, v in vars(args).items() if k != "smoke"}, "rows": rows,
                                       **figures}))


if __name__ == "__main__":
    main()
