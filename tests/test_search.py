"""The search on an embedded Ray: end to end, top-k, report, export, refusing to clobber a run."""
import dataclasses
import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from prunetune import build_model, load_config, load_data, load_pruned
from prunetune.search.baselines import BASELINES
from prunetune.search.cli import main
from prunetune.search.prepare import base_cache_path, model_spec, trained_base
from prunetune.search.runfiles import SCHEMA_VERSION, read_summary
from prunetune.search.store import CandidateStore
from prunetune.workers.record import best
from tests.runs import as_args, run_args, small
from tests.summaries import final_model, summary, timings

CANDIDATES = len(BASELINES) + 1  # the finished run's: every baseline, then one the algorithm proposes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The base-model cache of this module's runs of the same recipe (finished_run's and others): trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("search")
    overrides = small(tmp / "run", cache, candidates=CANDIDATES, top_k=2, epochs=2)
    code = main(["run", *as_args(overrides)])
    assert code == 0
    return tmp / "run", overrides


@pytest.mark.ray
@pytest.mark.slow
def test_every_candidate_lands_once_in_the_store(finished_run):
    run, _ = finished_run
    raw = pq.read_table(run / "candidates.parquet")
    assert sorted(raw.column("index").to_pylist()) == list(range(CANDIDATES))
    records = CandidateStore(str(run)).records()
    assert all(r.ok and r.error is None for r in records)
    assert all(abs(r.flops_ratio - 0.5) <= 0.02 and len(r.ratios) == 4 for r in records)
    assert all(r.node and r.device == "cpu" and r.t_calibrate > 0 and r.trial_id for r in records)
    assert json.load(open(run / "manifest.json"))["baselines"] == list(BASELINES)
    assert [r.source for r in sorted(records, key=lambda r: r.index)] == [*BASELINES, "random"]  # baselines first


@pytest.mark.ray
@pytest.mark.slow
def test_the_leaderboard_is_the_best_rows_of_the_store(finished_run):
    run, _ = finished_run
    board = json.load(open(run / "leaderboard.json"))
    top = best(CandidateStore(str(run)).records(), 2)
    assert [b["index"] for b in board] == [r.index for r in top]
    assert [b["score"] for b in board] == [r.score for r in top]


@pytest.mark.ray
@pytest.mark.slow
def test_final_models_summary_and_report(finished_run):
    run, _ = finished_run
    summary = read_summary(str(run))
    finals = summary.final
    assert json.load(open(run / "final" / "summary.json"))["schema_version"] == SCHEMA_VERSION
    assert [f.rank for f in finals] == [1, 2] and summary.metric == "accuracy"
    assert {f.candidate for f in finals} == {b["index"] for b in json.load(open(run / "leaderboard.json"))}
    assert finals[0].val >= finals[1].val or finals[1].tied_with_best
    # a fine-tuned epoch is kept unless epoch 0 is better beyond the margin (test_selection.py)
    assert all(f.val >= f.val_before_finetune - f.val_margin and
               f.kept_epoch in (0, 1, 2) and f.fine_tuned == (f.kept_epoch > 0) for f in finals)
    assert summary.splits.validation == 288 and summary.splits.heldout == 150
    assert all(f.epochs == 2 and f.latency_ms_batch1 > 0 for f in finals)
    model, record, metrics = load_pruned(str(run / "final" / "rank1.pt"))
    assert sum(p.numel() for p in model.parameters()) == record.params == finals[0].params
    assert metrics.test == finals[0].test and metrics == dataclasses.replace(finals[0], size_mb=None)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    report = (run / "report.md").read_text()
    assert "rank1.pt" in report and (run / "report.png").stat().st_size > 1000


@pytest.mark.ray
@pytest.mark.slow
def test_report_and_export(finished_run, capsys, tmp_path):
    run, _ = finished_run
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Best candidates by adaptive-BN score" in out and "rank2.pt" in out
    target = tmp_path / "m.ts"
    assert main(["export", str(run), "--rank", "2", "--format", "torchscript", "--to", str(target)]) == 0
    scripted = torch.jit.load(str(target))
    assert scripted(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert main(["export", str(run), "--rank", "7"]) == 2
    assert "--rank:" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused(finished_run, capsys):
    run, overrides = finished_run
    before = sorted(os.listdir(run))
    assert main(["run", *as_args(overrides)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "prunetune resume" in err
    assert main(["run", *as_args(overrides + ["search.target=0.4"])]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before


@pytest.mark.ray
@pytest.mark.slow
def test_resume_of_a_finished_run_does_nothing(finished_run, capsys):
    run, _ = finished_run
    assert main(["resume", str(run)]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_a_stored_candidate_is_fine_tuned_again_beside_the_run_s_own_models(finished_run, capsys):
    run, _ = finished_run
    final = run / "final"
    before = {p.name: p.read_bytes() for p in [*final.iterdir(), run / "report.md"]}
    assert main(["finetune", str(run), "--candidate", "3", "--set", "search.target=0.4"]) == 2
    assert "--set search.target: a candidate is fine-tuned again as the run found it" in capsys.readouterr().err
    assert main(["finetune", str(run), "--candidate", str(CANDIDATES)]) == 2
    assert f"stores no candidate {CANDIDATES} (it holds {CANDIDATES}: 0 to {CANDIDATES - 1})" in capsys.readouterr().err
    assert main(["finetune", str(run), "--candidate", "3", "--set", "finetune.epochs=1"]) == 0
    added = sorted(set(os.listdir(final)) - set(before))
    assert len(added) == 1 and re.fullmatch(r"candidate-3-[0-9a-f]{8}\.pt", added[0])
    assert all((final / name).read_bytes() == data for name, data in before.items() if name != "report.md")
    assert (run / "report.md").read_bytes() == before["report.md"]  # the run's own models and report untouched
    model, record, metrics = load_pruned(str(final / added[0]))
    assert record.ratios == next(r for r in CandidateStore(str(run)).records() if r.index == 3).ratios
    assert metrics.candidate == 3 and metrics.epochs == 1 and metrics.finetune["epochs"] == 1
    assert sum(p.numel() for p in model.parameters()) == record.params
    assert "candidate 3 fine-tuned for 1 epochs: test accuracy" in capsys.readouterr().out
    assert main(["finetune", str(run), "--candidate", "3", "--set", "finetune.epochs=1"]) == 2  # that recipe again
    assert "fine-tuned with this recipe already" in capsys.readouterr().err


def test_a_base_model_trained_here_is_the_same_in_every_process(tmp_path):
    data = load_data("digits")
    states = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever the process did before must not change the base model
        cfg = load_config(None, ["model.pretrain_epochs=1", f"output.cache_dir={tmp_path / str(i)}"])
        torch.manual_seed(cfg.finetune.seed)  # as prepare() does before building the base architecture
        model = build_model("digits_cnn", data.num_classes, 1)
        trained_base(cfg, model, data, log=open(os.devnull, "w"))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.ray
@pytest.mark.slow
def test_export_never_overwrites_and_names_a_bad_destination(finished_run, capsys, tmp_path):
    run, _ = finished_run
    own = run / "final" / "rank1.pt"
    before = own.read_bytes()
    for target, fragment in ((own, "already exists; prunetune does not overwrite it"),
                             (tmp_path / "no" / "such" / "m.pt", "--to: directory"),
                             (tmp_path / "taken.ts", "already exists")):
        if target.name == "taken.ts":
            target.write_text("someone's file")
        assert main(["export", str(run), "--format", "torchscript", "--to", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1
    assert own.read_bytes() == before and (tmp_path / "taken.ts").read_text() == "someone's file"
    assert main(["export", str(run), "--format", "torchscript", "--to", str(tmp_path)]) == 0
    assert torch.jit.load(str(tmp_path / "rank1.torchscript.pt"))(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.ray
@pytest.mark.slow
def test_an_export_to_the_default_place_refuses_a_users_file_and_replaces_only_its_own(finished_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    final = run / "final"
    for name, args in (("rank2.onnx", ["--format", "onnx"]), ("rank2.torchscript.pt", ["--format", "torchscript"]),
                       ("rank2.int8.onnx", ["--quantize", "int8"])):
        (final / name).write_bytes(b"mine\n")
        assert main(["export", str(run), "--rank", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert f"export: {final / name} already exists; prunetune does not overwrite it" in err, err
        assert "pass --to another name, or remove it" in err and len(err.splitlines()) == 1
        assert (final / name).read_bytes() == b"mine\n"
    (final / "rank2.onnx").unlink()
    for _ in range(2):  # exporting again, nothing changed, replaces the file the first export wrote
        assert main(["export", str(run), "--rank", "2", "--format", "onnx"]) == 0
        assert capsys.readouterr().out.strip() == str(final / "rank2.onnx")
    (final / "rank2.onnx").write_bytes(b"edited by me")  # an export the user changed is theirs
    assert main(["export", str(run), "--rank", "2", "--format", "onnx"]) == 2
    assert (final / "rank2.onnx").read_bytes() == b"edited by me"


@pytest.mark.ray
@pytest.mark.slow
def test_exports_and_a_users_files_survive_overwrite_which_removes_exactly_the_runs_files(finished_run, capsys,
                                                                                          tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    for args in (["--format", "onnx"], ["--format", "torchscript"],
                 ["--quantize", "int8", "--max-accuracy-drop", "100"]):
        assert main(["export", str(run), *args]) == 0
    (run / "final" / "rank7.pt").write_bytes(b"mine")  # named like a run's model (this run has top_k=2)
    (run / "NOTES.txt").write_text("mine")
    kept = {name: (run / name).read_bytes() for name in ("final/rank1.onnx", "final/rank1.torchscript.pt",
                                                          "final/rank1.int8.onnx", "final/rank7.pt", "NOTES.txt")}
    # a smaller run (fewer candidates, one epoch) than the one it overwrites: what it does not write again must go too
    overrides = [o for o in finished_run[1] if not o.startswith("output.dir=")] + [
        f"output.dir={run}", "search.num_candidates=2", "finetune.epochs=1"]
    assert main(["run", *as_args(overrides), "--overwrite"]) == 0
    assert read_summary(str(run)).search.candidates == 2
    assert {name: (run / name).read_bytes() for name in kept} == kept
    listed = json.load(open(run / "manifest.json"))["files"]
    assert {"leaderboard.json", "report.md", "report.png", "final/rank1.pt", "final/rank2.pt", "final/summary.json",
            "tune/search", "tune/finetune"} <= set(listed)
    files = [os.path.relpath(os.path.join(d, f), run) for d, _, names in os.walk(run) for f in names]
    unknown = [f for f in files if f not in kept and f not in ("config.yaml", "manifest.json", "exports.json")
               and f not in listed and not any(f.startswith(d + "/") for d in listed)
               and not re.fullmatch(r"candidates\.parquet/part-\d{6}-[0-9a-f]{8}\.parquet", f)]
    assert unknown == []  # the run lists every file it wrote
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx"]) == 2  # the old run's export is not this run's
    assert "it is not an export of this run" in capsys.readouterr().err
    assert (run / "final" / "rank1.onnx").read_bytes() == kept["final/rank1.onnx"]


@pytest.mark.parametrize("stage, damage", [("done", "delete"), ("finetune", "truncate")])
@pytest.mark.ray
@pytest.mark.slow
def test_resume_evaluates_again_what_the_manifest_has_but_the_disk_lost(finished_run, capsys, tmp_path, stage, damage):
    run = tmp_path / "copy"
    shutil.copytree(finished_run[0], run)
    manifest = json.load(open(run / "manifest.json"))
    json.dump({**manifest, "stage": stage}, open(run / "manifest.json", "w"))
    part = next((run / "candidates.parquet").glob("part-*.parquet"))  # the run compacted its rows into one part
    part.unlink() if damage == "delete" else part.write_bytes(part.read_bytes()[:100])
    assert main(["resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "its candidates are evaluated again" in err and "best model:" in out
    raw = pq.read_table(run / "candidates.parquet").column("index").to_pylist()
    assert sorted(raw) == list(range(CANDIDATES))
    summary = json.load(open(run / "final" / "summary.json"))
    assert summary["search"]["candidates"] == CANDIDATES and len(summary["final"]) == 2
    assert json.load(open(run / "manifest.json"))["stage"] == "done"


@pytest.mark.ray
def test_trials_no_node_can_run_are_refused_before_anything_is_written(ray_session, tmp_path, capsys):
    assert main(run_args(tmp_path, "resources.cpus_per_trial=4")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("prunetune: error: resources.cpus_per_trial: 4 CPU per trial, but the largest node of the Ray "
                   "cluster has 2 CPU (or resources.autoscaling: true if the cluster adds nodes on demand)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["pt", "torchscript", "onnx"])
@pytest.mark.ray
@pytest.mark.slow
def test_an_exported_model_takes_raw_test_images_and_scores_the_runs_test_accuracy(finished_run, tmp_path, fmt):
    run, _ = finished_run
    path = tmp_path / f"best.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--to", str(path)]) == 0
    test = load_data("digits").test
    raw, labels = test.images.float(), test.labels  # pixel values 0..16, as sklearn ships them
    if fmt == "pt":
        model, record, _ = load_pruned(str(path))
        contract = record.input
        logits = model(raw)
    elif fmt == "torchscript":
        files = {"prunetune.json": ""}
        model = torch.jit.load(str(path), _extra_files=files)
        contract = json.loads(files["prunetune.json"])["input"]
        logits = model(raw)
    else:
        import onnx
        import onnxruntime

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        contract = json.loads(props["prunetune"])["input"]
        session = onnxruntime.InferenceSession(str(path))
        logits = torch.from_numpy(session.run(None, {"input": raw.numpy()})[0])
    accuracy = float((torch.as_tensor(logits).argmax(1) == labels).float().mean())
    expected = read_summary(str(run)).final[0].test
    assert abs(accuracy - expected) < 1e-6
    assert contract["shape"] == [1, 8, 8] and contract["scale"] == 1 / 16 and contract["classes"] == list("0123456789")


@pytest.mark.ray
@pytest.mark.slow
def test_the_exported_test_split_gives_a_final_model_the_runs_test_accuracy(finished_run, tmp_path, capsys):
    import csv

    import numpy as np
    from PIL import Image

    run, _ = finished_run
    split = tmp_path / "digits-test"
    assert main(["export", str(run), "--test-split", str(split)]) == 0
    assert f"359 test images of digits written to {split}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(split / "labels.csv")))
    raw = torch.stack([torch.from_numpy(np.array(Image.open(split / r["file"]))).float()[None] for r in rows])
    labels = torch.tensor([int(r["label"]) for r in rows])
    assert all(r["file"].startswith(r["class"] + "/") for r in rows)
    model, _, metrics = load_pruned(str(run / "final" / "rank1.pt"))  # raw pixel values in, as the PNGs hold them
    with torch.no_grad():
        accuracy = float((model(raw).argmax(1) == labels).float().mean())
    assert abs(accuracy - metrics.test) < 1e-6
    assert main(["export", str(run), "--test-split", str(split)]) == 2  # never written over
    assert "--test-split: " in capsys.readouterr().err and len(list(csv.DictReader(open(split / "labels.csv")))) == 359


@pytest.mark.ray
@pytest.mark.slow
def test_int8_export_runs_on_raw_test_images_and_reports_fp32_and_int8_side_by_side(finished_run, tmp_path, capsys):
    import onnxruntime

    run, _ = finished_run
    path = tmp_path / "best.int8.onnx"
    code = main(["export", str(run), "--quantize", "int8", "--to", str(path), "--max-accuracy-drop", "100"])
    out = capsys.readouterr().out
    assert code == 0 and path.is_file() and f"written to {path}" in out
    test = load_data("digits").test
    session = onnxruntime.InferenceSession(str(path))
    logits = session.run(None, {"input": test.images.float().numpy()})[0]
    accuracy = float((torch.from_numpy(logits).argmax(1) == test.labels).float().mean())
    summary = read_summary(str(run))
    int8 = summary.final[0].int8
    assert abs(int8.test_accuracy - accuracy) < 1e-6 and int8.written and int8.path == str(path)
    assert abs(int8.fp32.test_accuracy - summary.final[0].test) < 1e-6  # the same model
    assert int8.size_mb < int8.fp32.size_mb
    assert re.search(rf"^int8 +{100 * accuracy:.2f}% ", out, re.M)
    assert "## int8 (ONNX Runtime static quantization)" in (run / "report.md").read_text()
    code = main(["export", str(run), "--quantize", "int8", "--to", str(tmp_path / "strict.onnx"),
                 "--max-accuracy-drop", "0"])
    drop = read_summary(str(run)).final[0].int8.accuracy_drop_points
    assert (code == 0) == (drop <= 0) == (tmp_path / "strict.onnx").is_file()  # over the margin: reported, not written
    path.write_bytes(b"edited by me")  # an export the user changed is theirs: never overwritten
    assert main(["export", str(run), "--quantize", "int8", "--to", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == b"edited by me"


@pytest.mark.ray
@pytest.mark.slow
def test_the_report_opens_with_a_recommendation(finished_run):
    run, _ = finished_run
    report = (run / "report.md").read_text().splitlines()
    top = read_summary(str(run)).final[0]
    epoch = f"fine-tuned, epoch {top.kept_epoch}" if top.kept_epoch else \
        "NOT fine-tuned: epoch 0, the pruned network before fine-tuning"
    assert report[2].startswith(f"**Recommended: `final/rank1.pt`** (candidate {top.candidate}, {epoch}): "
                                "test accuracy")
    assert re.search(r"(points below|points above|equal to) the base's [\d.]+%", report[2])
    # which of the four it says depends on the machine's timings (a busy one can time the pruned model slower)
    assert re.search(r"batch-1 latency [\d.]+x (faster|slower) than the base's|"
                     r"no measurable batch-1 (speed-up|slow-down)", report[2])
    assert "| test acc vs base |" in "\n".join(report)
    assert re.search(r"^\| base \| n/a \|", "\n".join(report), re.M)  # no held-out figure: the base trained on it


def test_the_cached_base_model_is_reused_when_only_the_fine_tuning_schedule_changes(tmp_path):
    data, log = load_data("digits"), tmp_path / "log.txt"
    paths = []
    for overrides in ([], ["finetune.epochs=1", "finetune.scheduler=fifo", "finetune.grace_epochs=1"]):
        cfg = load_config(None, ["model.pretrain_epochs=1", f"output.cache_dir={tmp_path}", *overrides])
        with open(log, "a") as f:
            paths.append(trained_base(cfg, build_model("digits_cnn", 10, 1), data, log=f))
    assert paths[0] == paths[1]
    assert "loaded" in log.read_text().splitlines()[-1] and "same model, data and training recipe" in log.read_text()
    cfg = load_config(None, ["model.pretrain_epochs=1", f"output.cache_dir={tmp_path}", "model.pretrain_lr=0.01"])
    assert base_cache_path(cfg, model_spec(cfg, 10, 1)) != paths[0]  # a recipe change is another base model


def _summary(base_ms: float, base_iqr: float, model_ms: float, model_iqr: float, granularity: str = "channel"):
    """A run summary as finalize writes it, with the given batch-1 timings (median, interquartile range)."""
    return summary([final_model(**timings(model_ms, model_iqr))], base_ms, base_iqr, granularity=granularity)


@pytest.mark.parametrize("timings, granularity, claim", [
    ((0.176, 0.02, 0.168, 0.02), "channel", "no measurable batch-1 speed-up (0.168 ms against the base's 0.176 ms "
                                            "on this machine, within the timing noise)"),
    ((0.20, 0.01, 0.10, 0.01), "channel",
     "batch-1 latency 2.00x faster than the base's (0.1 ms against the base's 0.2 ms on this machine)"),
    ((0.20, 0.01, 0.10, 0.01), "unstructured",
     "no batch-1 speed-up claimed: unstructured pruning is not expected to run faster than the dense base"),
    ((0.18, 0.01, 0.91, 0.02), "stripe", "batch-1 latency 5.06x slower than the base's"),
])
def test_the_recommendation_claims_a_speed_up_only_outside_the_timing_noise_and_where_the_method_gives_one(
        timings, granularity, claim):
    from prunetune.search.report import recommendation

    line = recommendation(_summary(*timings, granularity=granularity))
    assert claim in line and "unstable" not in line


def test_the_recommendation_says_when_the_timings_are_unstable():
    from prunetune.search.report import recommendation

    line = recommendation(_summary(1.0, 0.1, 1.28, 0.5))  # the model's spread is 39% of its median
    assert "no measurable batch-1 slow-down" in line and "x slower" not in line
    assert "the timings are unstable (spread over 25% of the median" in line


def test_the_reports_score_panel_is_filled_by_the_candidates_and_the_base_has_a_panel_of_its_own():
    from prunetune.search.report import figure
    from prunetune.workers.record import CandidateRecord

    records = [CandidateRecord(index=i, ratios=[0.3], flops=500_000, flops_ratio=0.49 + 0.004 * i, params=5_000,
                               score=0.40 + 0.03 * i, accuracy=0.40 + 0.03 * i) for i in range(6)]
    fig = figure(records, _summary(0.2, 0.01, 0.1, 0.01))
    overview, candidates = fig.axes[0], fig.axes[1]
    assert candidates.get_xlim()[1] < 0.6 and candidates.get_ylim()[1] < 0.7  # the base (1.0, 1.0) is not on it
    assert any(1.0 in c.get_offsets()[:, 0] for c in overview.collections)  # it is on the overview


def test_the_reports_finalist_labels_do_not_print_over_one_another():
    from prunetune.search.report import figure
    from prunetune.workers.record import CandidateRecord

    close = [final_model(rank=k + 1, candidate=10 + k, adaptive_bn_score=0.55 + 1e-4 * k, val=0.97 - 1e-4 * k)
             for k in range(4)]  # four finalists with close figures, and one far from them
    far = final_model(rank=5, candidate=14, adaptive_bn_score=0.2, val=0.5)
    records = [CandidateRecord(index=i, ratios=[0.3], flops=500_000, flops_ratio=0.5, params=5_000, score=0.5 + 0.1 * i,
                               accuracy=0.5) for i in range(2)]
    fig = figure(records, summary([*close, far]))
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[2].texts]
    assert sorted(t.get_text() for t in fig.axes[2].texts) == ["#10", "#11", "#12", "#13", "#14"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_report_gives_the_base_no_held_out_figure_since_a_given_checkpoint_most_likely_trained_on_it():
    from prunetune.search.report import finals_table

    table = finals_table(_summary(0.2, 0.01, 0.1, 0.01))
    assert re.search(r"^\| base \| n/a \| 99.00% \|", table, re.M) and "100.00%" not in table.split("\n")[2][:20]
    assert "a checkpoint you give was most likely trained on the whole training split" in table
    assert "a base prunetune trains leaves the held-out and validation splits out" in table
