"""Issue 35: YOLO-format data (data.name yolo), the yolo task (raw per-scale maps of an Ultralytics-style Detect head,
decoded as Ultralytics decodes them, greedy NMS, mAP@0.5:0.95 and mAP@0.5 from summable statistics, checked against
pycocotools), the search chain on the YOLO-shaped test blocks (tests/archs.py) without ultralytics, and their
`prunetune export --format ultralytics` (the checkpoint Ultralytics loads; bench/yolo_chain.py loads real ones)."""
import importlib.util
import os

import numpy as np
import pytest
import torch
import yaml

from prunetune.search.artifacts import pruned_record, save_pruned
from prunetune.search.cli import main
from prunetune.search.config import ConfigError, load_config
from prunetune.search.prepare import data_kwargs, make_sampler, model_spec, prepare, prove_space, task_of
from prunetune.search.rundir import RunDir
from prunetune.search.runfiles import read_exports
from prunetune.workers.data import DataError, collate, iterate_batches, load_data
from prunetune.workers.detection import COCO_IOUS, map_statistics, mean_average_precision, nms
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.groups import SpaceError
from prunetune.workers.models import build_model
from prunetune.workers.prune import PrunePlan
from prunetune.workers.scoring import score
from prunetune.workers.space import count_flops
from prunetune.workers.tasks import TASKS
from prunetune.workers.yolo import REG_MAX, YoloError, decode, raw_maps
from tests import archs
from tests.coco import coco_map, random_detections
from tests.yolo_data import COLOURS, write_yolo_dataset

YOLO = TASKS["yolo"]
ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_yolo_dataset(str(tmp_path_factory.mktemp("yolo")))


def test_yolo_data_is_letterboxed_with_every_box_on_its_square(dataset):
    data = load_data("yolo", dataset, 64)
    assert (len(data.train), len(data.test), data.num_classes, data.input_shape) == (48, 16, 3, (3, 64, 64))
    assert data.contract.classes == ("class0", "class1", "class2") and data.contract.scale == 1 / 255
    for i in (0, 1, 2):  # 64 x 64, 80 x 48 (padded above and below), 48 x 72 (padded left and right)
        x, labels = data.train[i]
        assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1 and len(labels) >= 1
        cls, cx, cy, w, h = labels[-1].tolist()  # the square drawn last (on top): its box's inside is its colour
        x0, y0, x1, y1 = (round(v * 64) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        inside = x[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].flatten(1)
        colour = torch.tensor(COLOURS[int(cls)], dtype=torch.float32)[:, None] / 255
        assert inside.shape[1] >= 16 and (inside - colour).abs().max() < 0.05
    grey = torch.full((3,), 114 / 255)
    assert torch.allclose(data.train[1][0][:, 0, 0], grey) and torch.allclose(data.train[2][0][:, 0, 0], grey)
    flipped = data.train_augmented
    torch.manual_seed(0)
    for _ in range(6):  # the flip moves the boxes with the pixels
        x, labels = flipped[0]
        assert torch.equal(x, data.train[0][0]) and torch.allclose(labels, data.train[0][1]) or \
            torch.equal(x, data.train[0][0].flip(-1)) and torch.allclose(labels[:, 1], 1 - data.train[0][1][:, 1])
    _, targets = collate([data.train[0], data.train[1]])  # box lists of any length
    assert isinstance(targets, list) and [len(t) for t in targets] == [len(data.train[i][1]) for i in (0, 1)]


@pytest.mark.parametrize("case, message", [
    ("no names", r"^data.path: .*data.yaml lacks names \(a YOLO dataset YAML gives train, val and names; path "
                 r"optional\)$"),
    ("bad label", r"^data.path: .*0000.txt line 1: expected 'class cx cy w h' with a class in \[0, 2\] and "
                  r"coordinates normalised to \[0, 1\], got '7 0.5 0.5 0.1 0.1'$"),
    ("image size", r"^data.image_size: yolo data is letterboxed to a multiple of 32 \(the largest stride of a YOLO "
                   r"head\), got 48$"),
    ("no file", r"^data.path: data set 'yolo' needs a dataset YAML file, not found: .*missing.yaml$"),
])
def test_bad_yolo_data_is_refused_in_one_line(tmp_path, case, message):
    path = write_yolo_dataset(str(tmp_path), train=3, val=1)
    size = 48 if case == "image size" else 64
    if case == "no names":
        spec = yaml.safe_load(open(path))
        del spec["names"]
        yaml.safe_dump(spec, open(path, "w"))
    if case == "bad label":
        (tmp_path / "labels" / "train" / "0000.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    if case == "no file":
        path = str(tmp_path / "missing.yaml")
    with pytest.raises(DataError, match=message):
        load_data("yolo", path, size)


@pytest.mark.parametrize("returns", ["maps", "dict"])
def test_the_task_reads_the_raw_maps_of_both_ultralytics_contracts_in_train_and_eval_mode(returns):
    torch.manual_seed(0)
    model = archs.yolo_like(3, returns).eval()
    x = torch.randn(2, 3, 64, 64)
    decoded, _ = model(x)
    evaluated = raw_maps(model(x))
    model.detect.training = True  # the head's training-mode output (its BatchNorms stay in eval mode)
    trained = raw_maps(model(x))
    assert [tuple(m.shape) for m in trained] == [(2, 4 * REG_MAX + 3, s, s) for s in (8, 4, 2)]
    assert all(torch.equal(a, b) for a, b in zip(trained, evaluated))
    boxes, scores = decode(evaluated)  # as Ultralytics decodes (the test block's eval output), normalised
    xywh = torch.cat(((boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]), -1)
    assert torch.allclose(xywh * 64, decoded[:, :4].transpose(1, 2), atol=1e-4)
    assert torch.allclose(scores, decoded[:, 4:].transpose(1, 2))
    assert YOLO.check(evaluated, 3) is None
    assert YOLO.check(evaluated, 4) == ("task yolo needs maps of 4 x 16 (reg_max) + 4 (classes) = 68 channels, got "
                                        "67 (another reg_max needs a task function returning "
                                        "prunetune.workers.yolo.task(reg_max=...))")


def test_a_segment_heads_eval_output_is_read_by_its_boxes():
    torch.manual_seed(0)
    decoded, raw = archs.yolo_like(3, "dict").eval()(torch.randn(2, 3, 64, 64))
    proto = torch.randn(2, 32, 16, 16)  # Ultralytics 8.4's Segment: ((decoded, prototypes), raw + mask keys)
    segment = ((decoded, proto), {**raw, "mask_coefficient": torch.randn(2, 32, decoded.shape[2]), "proto": proto})
    maps = raw_maps(segment)
    assert [tuple(m.shape) for m in maps] == [(2, 4 * REG_MAX + 3, s, s) for s in (8, 4, 2)]
    assert all(torch.equal(a, b) for a, b in zip(maps, raw_maps(raw)))


def test_an_end_to_end_head_is_refused_in_one_line():
    head = {"boxes": torch.zeros(1, 64, 4), "scores": torch.zeros(1, 3, 4), "feats": [torch.zeros(1, 8, 2, 2)]}
    with pytest.raises(ValueError, match=r"^an end-to-end head \(one2many and one2one branches: YOLOv10, YOLO26\) "
                                         r"is not supported$"):
        raw_maps({"one2many": head, "one2one": head})
    with pytest.raises(SpaceError, match=r"^model: task yolo finds no prediction in the forward pass's output "
                                         r"\(Tensor: ValueError: no per-scale maps \[N, C, H, W\] in a Tensor\)$"):
        prove_space(load_config(None, ["model.task=yolo"]), archs.FlattenCNN(), torch.zeros(1, 1, 8, 8), 10)


def _oracle_maps(labels: list[torch.Tensor], classes: int, widen: float = 0.0) -> list[torch.Tensor]:
    """Raw maps of a 64 px input (strides 8, 16, 32) whose finest scale finds each label's box (its right side moved
    out by `widen` times its width) at the cell of its centre, with class score sigmoid(10); all else sigmoid(-10)."""
    maps = [torch.full((len(labels), 4 * REG_MAX + classes, 64 // s, 64 // s), -30.0) for s in (8, 16, 32)]
    for m in maps:
        m[:, 4 * REG_MAX:] = -10.0
    for i, image in enumerate(labels):
        for cls, cx, cy, w, h in image.tolist():
            col, row = int(cx * 8), int(cy * 8)
            ax, ay = col + 0.5, row + 0.5
            sides = [ax - (cx - w / 2) * 8, ay - (cy - h / 2) * 8, (cx + w / 2 + widen * w) * 8 - ax,
                     (cy + h / 2) * 8 - ay]
            for k, d in enumerate(sides):  # the DFL's expectation is d: weights 1 - f and f on its two bins
                low, f = int(d), d - int(d)
                maps[0][i, k * REG_MAX + low, row, col] = float(np.log(1 - f))
                if f:
                    maps[0][i, k * REG_MAX + low + 1, row, col] = float(np.log(f))
            maps[0][i, 4 * REG_MAX + int(cls), row, col] = 10.0
    return maps


LABELS = [torch.tensor([[0, 0.30, 0.30, 0.25, 0.20], [2, 0.70, 0.65, 0.30, 0.35]]),
          torch.tensor([[1, 0.45, 0.55, 0.20, 0.30]]), torch.zeros(0, 5)]


def test_maps_that_find_every_box_score_one_and_a_loose_fit_counts_only_at_the_low_thresholds():
    exact = YOLO.score(YOLO.statistics(_oracle_maps(LABELS, 3), LABELS))
    assert exact == {"map50_95": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    loose = YOLO.score(YOLO.statistics(_oracle_maps(LABELS, 3, widen=1 / 0.72 - 1), LABELS))  # IoU 0.72
    assert loose == {"map50_95": pytest.approx(0.5), "map50": pytest.approx(1.0)}  # hits at 0.5, ..., 0.7 of 10


def test_the_statistics_sum_exactly_over_images():
    torch.manual_seed(0)
    maps = [m + torch.randn_like(m) for m in _oracle_maps(LABELS, 3)]
    whole = YOLO.statistics(maps, LABELS)
    parts = sum(YOLO.statistics([m[i:i + 1] for m in maps], LABELS[i:i + 1]) for i in range(len(LABELS)))
    assert torch.equal(whole, parts) and 0 < YOLO.score(whole)["map50_95"] < 1


def test_greedy_nms_keeps_the_best_box_of_each_overlapping_cluster_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores, classes = torch.tensor([0.8, 0.9, 0.7, 0.6, 0.5]), torch.tensor([0, 0, 1, 0, 0])
    assert nms(boxes, scores, classes, 0.5, 300).tolist() == [1, 2, 3]  # box 0 and 4 overlap box 1 at IoU > 0.5
    assert nms(boxes, scores, classes, 0.7, 300).tolist() == [1, 0, 2, 3]  # box 0 overlaps box 1 at 0.68
    assert nms(boxes, scores, classes, 0.5, 2).tolist() == [1, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_map_over_coco_thresholds_agrees_with_pycocotools_on_random_boxes(seed):
    pytest.importorskip("pycocotools", reason="pycocotools not installed (the test extra has it)")
    found, truths = random_detections(seed, jitter=0.5)  # IoUs spread over COCO's thresholds
    want = coco_map(found, truths, COCO_IOUS)
    got = mean_average_precision(map_statistics(found, truths, 3, ious=COCO_IOUS), 3)
    assert 0.1 < want < 0.9 and got == pytest.approx(want, abs=0.01)


def _config(dataset: str, tmp_path, *more) -> object:
    return load_config(None, ["data.name=yolo", f"data.path={dataset}", "data.image_size=64",
                              "model.name=tests.archs:yolo_like", "model.task=yolo", "evaluation.heldout_size=16",
                              "evaluation.batch_size=8", "evaluation.calibration_batches=2", "search.num_candidates=4",
                              "search.top_k=1", f"output.dir={tmp_path}/run", *more])


def test_the_search_chain_runs_on_a_yolo_like_detector_without_ultralytics(dataset, tmp_path):
    cfg = _config(dataset, tmp_path)
    data = load_data(**data_kwargs(cfg))
    torch.manual_seed(0)
    model = build_model(**model_spec(cfg, data.num_classes, 3)).eval()
    verdict = prove_space(cfg, model, data.example_input(), data.num_classes)  # the preflight: FLOPs = fvcore's
    assert verdict.left_out == [] and {"detect.dfl.conv", "detect.cv2.0.2", "detect.cv3.2.2"} <= \
        set(verdict.space.ignored_layers)
    sampler = make_sampler(cfg, verdict.space)
    evaluator = CandidateEvaluator(model, verdict.space, data, cfg.evaluation, "cpu", task=task_of(cfg))
    for i in range(2):
        record = evaluator.evaluate(sampler.sample(i), i)
        assert set(record.metrics) == {"map50_95", "map50"} and record.loss is None
        assert all(0 <= v <= 1 for v in record.metrics.values()) and record.score == record.metrics["map50_95"]
        assert record.bn_recalibrated and abs(record.flops_ratio - cfg.search.target) <= cfg.search.tolerance
        pruned = evaluator.prune(np.array(record.ratios))
        assert record.flops == count_flops(pruned, data.example_input()).total()
        evaluator.recalibrate(pruned)  # the evaluator's figures are the task's score of the recalibrated network
        heldout = iterate_batches(data.train, evaluator.heldout_indices, 8)
        assert score(pruned, heldout, task=YOLO) == {**record.metrics, "samples": 16}


@pytest.mark.skipif(ULTRALYTICS, reason="ultralytics is installed: its loss runs")
def test_without_ultralytics_training_is_refused_in_one_line_before_anything_runs(dataset, tmp_path):
    message = r"^model.task: task yolo trains \(the base model, fine-tuning\) with Ultralytics' loss, and " \
              r"ultralytics does not import here \(.*\); pip install 'prunetune\[yolo\]' \(scoring needs no " \
              r"ultralytics: prunetune inspect works without it\)$"
    with pytest.raises(ConfigError, match=message):
        prepare(_config(dataset, tmp_path))
    with pytest.raises(YoloError, match=message):
        YOLO.loss(_oracle_maps(LABELS, 3), LABELS)


def test_a_held_out_loss_is_refused_as_the_search_metric_of_the_yolo_task(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"^evaluation.metric: task yolo gives no held-out loss; allowed: accuracy "
                                          r"\(its map50_95\)$"):
        _config(dataset, tmp_path, "evaluation.metric=loss")


def _run_with_final_model(cfg, task: str) -> tuple[RunDir, torch.nn.Module]:
    """A run directory of `cfg` whose final/rank1.pt is the base pruned by the sampler's first strategy (as a
    finished run leaves it); the pruned network (bare: no input contract's preprocessing)."""
    run = RunDir(cfg.output.dir)
    run.create(cfg, overwrite=False)
    data = load_data(**data_kwargs(cfg))
    spec = model_spec(cfg, data.num_classes, data.input_shape[0])
    torch.manual_seed(0)
    model = build_model(**spec).eval()
    verdict = prove_space(cfg, model, data.example_input(), data.num_classes)
    ratios = make_sampler(cfg, verdict.space).sample(0)
    pruned = PrunePlan(model, verdict.space, "l1", 0).apply(ratios).eval()
    record = pruned_record(spec, verdict.space, ratios, "l1", "channel", "", data.contract, task)
    save_pruned(os.path.join(run.final_path, "rank1.pt"), pruned, record)
    return run, pruned


def test_the_ultralytics_export_is_the_checkpoint_ultralytics_loads_with_the_pruned_network(dataset, tmp_path, capsys):
    cfg = _config(dataset, tmp_path)
    run, pruned = _run_with_final_model(cfg, "yolo")
    base = archs.yolo_like(3)
    for _ in range(2):  # the second export replaces the first (its own file)
        assert main(["export", run.path, "--format", "ultralytics"]) == 0
        out, err = capsys.readouterr()
        path = os.path.join(run.final_path, "rank1.ultralytics.pt")
        assert out == f"{path}\n"
        assert err == ("prunetune: warning: export: the model is a tests.archs.YoloLike, not an Ultralytics model "
                       "(ultralytics.nn.tasks.DetectionModel): YOLO(path) reads only Ultralytics' own\n")
    # Ultralytics' checkpoint is a pickle (its load_checkpoint reads it with weights_only=False): ours, just written
    checkpoint = torch.load(path, weights_only=False)
    assert {"model", "train_args", "epoch", "ema", "optimizer", "best_fitness", "date", "version"} <= set(checkpoint)
    assert (checkpoint["epoch"], checkpoint["ema"], checkpoint["optimizer"]) == (-1, None, None)  # a finished model
    assert checkpoint["train_args"] == {"task": "detect", "imgsz": 64, "data": os.path.abspath(dataset)}
    model = checkpoint["model"]
    assert type(model) is archs.YoloLike and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.names == {0: "class0", 1: "class1", 2: "class2"}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in pruned.state_dict().items()} != \
        {k: v.shape for k, v in base.state_dict().items()}  # the pruned widths
    x = torch.rand(2, 3, 64, 64)  # values 0..1, as Ultralytics feeds them
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(raw_maps(model(x)), raw_maps(pruned(x))))
    halves = [(name, m) for name, m in model.named_modules() if isinstance(m, archs.C2f)]
    assert len(halves) == 7 and all(m.c == m.cv1.conv.out_channels // 2 for _, m in halves)
    assert any(m.c != dict(base.named_modules())[name].c for name, m in halves)  # split((c, c)) where pruned
    assert read_exports(run.path).files["final/rank1.ultralytics.pt"].format == "ultralytics"


def test_the_ultralytics_export_of_a_model_that_is_not_a_yolo_detector_is_refused_in_one_line(tmp_path, capsys):
    cfg = load_config(None, [f"output.dir={tmp_path}/run"])  # the digits classifier
    run, _ = _run_with_final_model(cfg, "classification")
    assert main(["export", run.path, "--format", "ultralytics"]) == 2
    assert capsys.readouterr().err == ("prunetune: error: --format: ultralytics writes a model.task yolo run's "
                                       "detector (an Ultralytics model) as an Ultralytics checkpoint; this run's task "
                                       "is classification: allowed formats pt, torchscript, onnx\n")
    assert not os.path.exists(os.path.join(run.final_path, "rank1.ultralytics.pt"))
