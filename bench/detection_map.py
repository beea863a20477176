"""What the detection example's mAP@0.5 costs per held-out batch: its summable statistics (examples/detection.py,
loss included) against pycocotools' COCOeval (AP at IoU 0.5) over the same detections, one thread.

The detector, trained briefly here (Adam, --epochs on 640 squares; every cell a detection, 16 per image), runs on
the example's test squares; per batch, the forward pass, `statistics` and its mAP part alone (`map_statistics`)
are timed; `score` once on the sum; COCOeval (index, evaluate, accumulate) once on all batches' detections,
divided by the batch count. Both mAPs are printed (they agree to the binning and COCO's 101-point interpolation).

python bench/detection_map.py [--epochs 20] [--batches 8] [--batch-size 64] [--repeats 5]
python bench/detection_map.py --smoke    # seconds: 2 epochs, 2 batches of 16, one repeat
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import median, parse_args, save, table  # noqa: E402
from examples import detection  # noqa: E402
from tests.coco import coco_map  # noqa: E402

torch.set_num_threads(1)


def trained(epochs: int) -> torch.nn.Module:
    """The example's detector after `epochs` of Adam (lr 0.01, batches of 32) on 640 squares, in eval mode."""
    torch.manual_seed(0)
    model, data = detection.detector(), detection.Squares(640, 0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(data)).tolist()
        for i in range(0, len(data), 32):
            batch = order[i:i + 32]
            loss = detection.loss(model(data.images[batch]), [data.boxes[j] for j in batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = parse_args(p, {"epochs": 2, "batches": 2, "batch_size": 16, "repeats": 1})
    model = trained(args.epochs)
    data = detection.Squares(args.batches * args.batch_size, 1)
    batches = [(data.images[i:i + args.batch_size], data.boxes[i:i + args.batch_size])
               for i in range(0, len(data), args.batch_size)]
    times: dict[str, list[float]] = {"forward": [], "statistics": [], "counts": [], "score": [], "pycocotools": []}
    for _ in range(args.repeats):
        summed, found, truths = 0, [], []
        for images, boxes in batches:
            t = time.perf_counter()
            with torch.no_grad():
                prediction = model(images)
            times["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            summed = summed + detection.statistics(prediction, boxes)
            times["statistics"].append(time.perf_counter() - t)
            t = time.perf_counter()
            detection.map_statistics(detection.detections(prediction), boxes, detection.CLASSES)
            times["counts"].append(time.perf_counter() - t)
            found += detection.detections(prediction)
            truths += boxes
        t = time.perf_counter()
        ours = detection.score(summed)["map50"]
        times["score"].append(time.perf_counter() - t)
        t = time.perf_counter()
        coco = coco_map(found, truths)
        times["pycocotools"].append((time.perf_counter() - t) / len(batches))
    rows = [{"what": what, "per": per, "median_ms": 1000 * median(times[key])} for what, per, key in
            [("detector forward", "batch", "forward"), ("statistics (loss + mAP counts)", "batch", "statistics"),
             ("of which the mAP counts", "batch", "counts"),
             ("score (mAP of the sum)", "evaluation", "score"),
             ("pycocotools COCOeval / batches", "batch", "pycocotools")]]
    print(f"detector trained {args.epochs} epochs; mAP@0.5 of {args.batches} batches of {args.batch_size} images "
          f"(16 detections each), 1 thread, {args.repeats} repeats: binned {ours:.4f}, pycocotools {coco:.4f}")
    print(table(rows, ["what", "per", "median_ms"]))
    print("saved", save("detection_map", {"args": vars(args), "map50": {"binned": ours, "pycocotools": coco},
                                          "rows": rows}))


if __name__ == "__main__":
    main()
