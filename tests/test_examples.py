"""Every config in examples/ runs end to end (with small overrides: few candidates, one epoch, tiny data), and the
docs' getting-started page shows exactly these examples."""
import glob
import json
import os
import re
import shlex
import shutil

import pytest
import torch

from examples.shapes import shapes
from prunetune import load_pruned
from prunetune.search.cli import main
from prunetune.search.config import load_config
from prunetune.search.prepare import prepare
from prunetune.search.runfiles import read_summary
from prunetune.search.store import CandidateStore
from tests.faults import ROOT
from tests.runs import as_args, reachable_latency, small
from tests.test_data import _write_cifar, _write_images

EXAMPLES = os.path.join(ROOT, "examples")
TESTED = {"digits.yaml", "cifar10-resnet56.yaml", "torchvision-resnet18.yaml", "latency.yaml", "slimming.yaml",
          "unstructured.yaml", "stripe.yaml", "segmentation.yaml", "detection.yaml"}  # each has its test below


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the digits examples share their small base model."""
    return tmp_path_factory.mktemp("cache")


def _run(name: str, tmp_path, cache, *extra: str) -> dict:
    """Run examples/NAME with the small run's overrides but the example's own search algorithm (and `extra`); its
    summary."""
    overrides = [o for o in small(tmp_path / "run", cache, "search.batch_size=2", "latency.repeats=5",
                                  "latency.throughput_batch_size=8", *extra, candidates=4)
                 if not o.startswith("search.algorithm=")]
    assert main(["run", os.path.join(EXAMPLES, name), *as_args(overrides)]) == 0
    return json.load(open(tmp_path / "run" / "final" / "summary.json"))


def _scalars(folder) -> dict:
    """tag -> [(step, value)] of the TensorBoard events files in `folder` (TFRecord framing, tensorboardX's
    Event protobuf)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, at = open(path, "rb").read(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_the_docs_show_exactly_the_examples_the_tests_run_each_into_its_own_output_dir():
    page = open(os.path.join(ROOT, "docs", "getting-started.md")).read()
    configs = {name for name in os.listdir(EXAMPLES) if name.endswith(".yaml")}  # (beside them, their modules)
    assert set(re.findall(r"examples/([\w.-]+\.yaml)", page)) == configs == TESTED
    guide = open(os.path.join(ROOT, "docs", "guides", "configuration.md")).read()
    assert '```yaml\n--8<-- "examples/cifar10-resnet56.yaml"\n```' in guide  # the file itself, included at build
    dirs = [load_config(os.path.join(EXAMPLES, name)).output.dir for name in sorted(configs)]
    assert len(set(dirs)) == len(dirs) and load_config(None).output.dir not in dirs  # no run overwrites another


@pytest.mark.ray
@pytest.mark.slow
def test_the_digits_example_ends_with_what_next_commands_that_work(ray_session, tmp_path, cache, capsys):
    summary = _run("digits.yaml", tmp_path, cache)
    assert summary["search"]["target"] == 0.5 and summary["granularity"] == "channel"
    out = capsys.readouterr().out
    commands = re.findall(r"^  (prunetune .*?)\s+#", out[out.index("what next:"):], re.M)
    assert [c.split()[1] for c in commands] == ["report", "export", "export"]
    for command in commands:  # each works as printed (DIR: a directory of the user's choice)
        assert main(shlex.split(command.replace("DIR", str(tmp_path / "test-split")))[1:]) == 0
    out = capsys.readouterr().out
    assert "Fine-tuned models:" in out and os.path.isfile(tmp_path / "run" / "final" / "rank1.onnx")
    assert os.path.isfile(tmp_path / "test-split" / "labels.csv")
    curves = _scalars(tmp_path / "run" / "tune" / "search" / "curves")  # `tensorboard --logdir OUTPUT/tune` reads these
    best = [v for _, v in curves["search/best_score"]]
    assert [s for s, _ in curves["search/best_score"]] == [1, 2, 3, 4] and best == sorted(best)
    assert max(v for _, v in curves["search/score"]) == best[-1]
    finalist, = glob.glob(os.path.join(tmp_path, "run", "tune", "finetune", "finalist*", ""))
    epochs = _scalars(finalist)["ray/tune/val_accuracy"]
    assert [s for s, _ in epochs] == [1] and 0 < epochs[0][1] <= 1  # one point per fine-tuning epoch


@pytest.mark.ray
@pytest.mark.slow
def test_the_cifar10_resnet56_example_runs_from_the_committed_checkpoint(ray_session, tmp_path, cache, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example names the checkpoint relative to the repository
    data = tmp_path / "cifar-10-batches-py"
    _write_cifar(str(data), n=40)  # 200 training images, 40 test images, random pixels
    summary = _run("cifar10-resnet56.yaml", tmp_path, cache, f"data.path={data}", "evaluation.heldout_size=32",
                   "evaluation.batch_size=16", "finetune.batch_size=32", "resources.gpus_per_trial=0",
                   "resources.cpus_per_trial=1")
    assert summary["base"]["checkpoint"].endswith("bench/checkpoints/resnet56-cifar10.pt")
    assert abs(summary["final"][0]["flops_ratio"] - 0.5) <= 0.01


@pytest.mark.ray
@pytest.mark.slow
def test_the_torchvision_example_runs_on_an_image_folder(ray_session, tmp_path, cache):
    pytest.importorskip("torchvision", reason="no torchvision that imports beside this torch (docs: getting started)")
    data = tmp_path / "images"
    _write_images(str(data), 40, per_class=50)  # 3 classes, train/ and test/
    summary = _run("torchvision-resnet18.yaml", tmp_path, cache, f"data.path={data}", "data.image_size=32",
                   "model.pretrain_epochs=1", "evaluation.heldout_size=16", "evaluation.batch_size=16")
    assert summary["input"]["classes"] == ["cat", "dog", "emu"] and summary["final"][0]["flops_ratio"] < 0.6


@pytest.mark.ray
@pytest.mark.slow
def test_the_latency_example_times_every_candidate_under_its_budget(ray_session, tmp_path, cache):
    timing = ["latency.grid=3", "latency.repeats=5", "latency.max_fit_error=10"]  # the search, not the fit
    probe = [f"output.dir={tmp_path / 'probe'}", f"output.cache_dir={cache}", *timing]
    _run("latency.yaml", tmp_path, cache, *timing, *reachable_latency(os.path.join(EXAMPLES, "latency.yaml"), probe))
    run = tmp_path / "run"
    summary = read_summary(str(run))
    assert summary.search.constraint == "latency" and summary.search.limits == {"params": 0.7}
    records = CandidateStore(str(run)).records()
    assert all(r.ok and r.latency_ms > 0 and r.latency_predicted_ms > 0 and r.within_budget is not None
               and r.params <= 0.7 * summary.base.params + 1e-9 for r in records)
    assert summary.base.latency_predicted_ms > 0 and summary.final[0].latency_predicted_ms > 0
    # the models are timed at the table's batch too, interleaved with the base: what the prediction is checked against
    assert summary.latency.batch_size == 32 and summary.base.latency_ms_budget_batch > 0
    assert all(f.latency_ms_budget_batch > 0 for f in summary.final)
    report = (run / "report.md").read_text()
    assert "predicted" in report.split("| base |")[1].split("\n")[0]
    layers = summary.latency.layers  # where the recommended model's time went, layer by layer
    assert {c["name"] for c in layers} >= {"features.0"} and all(c["base_ms"] >= c["pruned_ms"] >= 0 for c in layers)
    assert "## Where the time went" in report and "| features.0 |" in report
    shutil.rmtree(cache / "latency")  # the run's own copy of the table is what a resume predicts with
    prep = prepare(load_config(str(run / "config.yaml")))
    assert prep.space.latency.to_dict() == json.load(open(run / "latency-table.json"))


@pytest.mark.ray
@pytest.mark.slow
def test_the_network_slimming_example_trains_sparsity_first(ray_session, tmp_path, cache):
    summary = _run("slimming.yaml", tmp_path, cache, "model.sparsity_epochs=1")
    assert summary["sparsity"]["method"] == "Network Slimming" and summary["sparsity"]["lambda"] == 0.05


@pytest.mark.ray
@pytest.mark.slow
def test_the_unstructured_example_claims_no_speed_up(ray_session, tmp_path, cache):
    summary = _run("unstructured.yaml", tmp_path, cache)
    assert summary["granularity"] == "unstructured" and summary["search"]["constraint"] == "params"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "x faster" not in report and "dense kernels do not run them faster" in report
    records = CandidateStore(str(tmp_path / "run")).records()  # 4, every one within 0.02 of its 30% params budget
    assert len(records) == 4 and all(r.ok and abs(r.params / summary["base"]["params"] - 0.3) <= 0.02 for r in records)
    assert {r.source for r in records} >= {"uniform", "global threshold"}
    model, record, _ = load_pruned(str(tmp_path / "run" / "final" / "rank1.pt"))
    nonzero = sum(int((m.weight != 0).sum()) for m in model.modules() if hasattr(m, "weight_mask"))
    assert record.granularity == "unstructured" and nonzero == sum(record.kept_units)


@pytest.mark.ray
@pytest.mark.slow
def test_the_stripe_example_trains_the_filter_skeleton_first(ray_session, tmp_path, cache):
    summary = _run("stripe.yaml", tmp_path, cache, "model.sparsity_epochs=1")
    assert summary["granularity"] == "stripe" and summary["sparsity"]["method"] == "Filter Skeleton"
    records = CandidateStore(str(tmp_path / "run")).records()
    assert all(r.ok and abs(r.flops_ratio - 0.5) <= 0.02 for r in records)
    model, record, _ = load_pruned(str(tmp_path / "run" / "final" / "rank1.pt"))
    assert record.granularity == "stripe" and any(type(m).__name__ == "StripeConv2d" for m in model.modules())
    assert "## Sparsity training (Filter Skeleton)" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_the_segmentation_example_scores_miou_from_search_to_export(ray_session, tmp_path, cache):
    summary = _run("segmentation.yaml", tmp_path, cache, "data.kwargs={train_size: 160, test_size: 32}",
                   "evaluation.heldout_size=64")
    assert summary["task"] == {"name": "segmentation", "metric": "miou", "metrics": ["miou", "pixel_accuracy", "loss"],
                               "higher_is_better": True}
    final = summary["final"][0]
    assert final["metric"] == "miou" and 0 <= final["val"] <= 1 and 0 <= final["test"] <= 1
    assert 0 <= summary["base"]["test"] <= 1
    records = CandidateStore(str(tmp_path / "run")).records()
    assert all(list(r.metrics) == ["miou", "pixel_accuracy", "loss"] and r.score == r.metrics["miou"]
               and r.accuracy is None for r in records)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| search rank | candidate | proposed by | score | held-out miou |" in report
    assert "| model | val miou | test miou | test miou vs base |" in report
    assert main(["export", str(tmp_path / "run"), "--rank", "1", "--format", "torchscript"]) == 0
    exported = torch.jit.load(str(tmp_path / "run" / "final" / "rank1.torchscript.pt"))
    images, _ = shapes(2)  # a factory's data has no input contract: the model takes the factory's tensors
    assert tuple(exported(images).shape) == (2, 3, 16, 16)  # the per-pixel logits, not the dict with aux


@pytest.mark.ray
@pytest.mark.slow
def test_the_detection_example_scores_map_through_its_user_task(ray_session, tmp_path, cache):
    summary = _run("detection.yaml", tmp_path, cache, "data.kwargs={train_size: 160, test_size: 32}",
                   "evaluation.heldout_size=32", "evaluation.batch_size=16", "finetune.batch_size=16")
    assert summary["task"] == {"name": "detection", "metric": "map50", "metrics": ["map50", "loss"],
                               "higher_is_better": True}
    assert summary["final"][0]["metric"] == "map50" and 0 <= summary["final"][0]["test"] <= 1 \
        and summary["final"][0]["val"] is not None
    records = CandidateStore(str(tmp_path / "run")).records()
    assert len(records) == 4 and all(r.ok and list(r.metrics) == ["map50", "loss"] and r.score == r.metrics["map50"]
                                     for r in records)
    assert "| model | val map50 | test map50 | test map50 vs base |" in (tmp_path / "run" / "report.md").read_text()
    assert os.path.isfile(tmp_path / "run" / "final" / "rank1.pt")
