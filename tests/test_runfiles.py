"""The typed run files: a run directory written before them (tests/fixtures/run-v1, by prunetune at 99d7dae) still
reports, resumes and exports; what this prunetune writes reads back equal; only search/runfiles.py names the files."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import yaml

from prunetune import load_pruned
from prunetune.search.artifacts import save_pruned
from prunetune.search.cli import main
from prunetune.search.rundir import RunDir
from prunetune.search.runfiles import (SCHEMA_VERSION, Exports, Int8, Manifest, OnnxFigures, RunFileError, Summary,
                                       read_exports, read_manifest, read_summary, write)
from tests.summaries import final_model, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run-v1")


@pytest.fixture
def old_run(tmp_path):
    """A copy of the fixture run (never written into where it is kept)."""
    return shutil.copytree(FIXTURE, tmp_path / "run")


def test_the_fixture_is_a_run_from_before_schema_versions():
    for name in ("final/summary.json", "manifest.json", "exports.json"):
        assert "schema_version" not in json.load(open(os.path.join(FIXTURE, name)))
    assert "test_accuracy" in json.load(open(os.path.join(FIXTURE, "final", "summary.json")))["final"][0]


def test_a_run_written_before_schema_versions_reports_as_it_did(old_run, capsys):
    assert main(["report", str(old_run)]) == 0
    expected = open(FIXTURE + ".report.txt").read().replace("{run}", str(old_run))
    assert capsys.readouterr().out == expected  # the lines prunetune at 99d7dae printed for it


def test_a_run_written_before_schema_versions_is_complete_for_resume(old_run, capsys):
    assert main(["resume", str(old_run)]) == 0
    assert capsys.readouterr().out == f"{old_run}: the run is already complete\n"


def test_resume_with_a_config_of_another_run_is_refused_in_one_line(old_run, tmp_path, capsys):
    assert main(["resume", str(old_run), "--config", str(old_run / "config.yaml")]) == 0  # its own: resumes
    other = tmp_path / "other.yaml"
    config = yaml.safe_load((old_run / "config.yaml").read_text())
    config["evaluation"]["seed"] += 1  # another run's
    other.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["resume", str(old_run), "--config", str(other)]) == 2
    assert capsys.readouterr().err == (f"prunetune: error: --config: {other} does not match the run in {old_run}; "
                                       "resume it without --config, or start a new run\n")
    assert read_manifest(str(old_run)).stage == "done"


def test_a_run_written_before_schema_versions_exports_and_replaces_its_own_earlier_export(old_run, capsys):
    old = read_exports(str(old_run)).files["final/rank1.torchscript.pt"]
    assert old.format == "torchscript" and old.run_id == read_manifest(str(old_run)).run_id
    assert main(["export", str(old_run), "--rank", "1", "--format", "torchscript"]) == 0  # its own: replaced
    assert main(["export", str(old_run), "--rank", "1", "--format", "onnx"]) == 0
    exports = json.load(open(old_run / "exports.json"))
    assert exports["schema_version"] == SCHEMA_VERSION
    assert sorted(exports["files"]) == ["final/rank1.onnx", "final/rank1.torchscript.pt"]
    assert exports["files"]["final/rank1.torchscript.pt"]["written"] > old.written
    (old_run / "final" / "mine.onnx").write_bytes(b"mine")
    assert main(["export", str(old_run), "--format", "onnx", "--to", str(old_run / "final" / "mine.onnx")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_summary_from_before_schema_versions_reads_with_the_metric_as_a_field():
    raw = json.load(open(os.path.join(FIXTURE, "final", "summary.json")))
    old = Summary.from_json(raw)
    assert old.metric == "accuracy" and old.schema_version == SCHEMA_VERSION
    assert old.base.test == raw["base"]["test_accuracy"] and old.base.val == raw["base"]["val_accuracy"]
    top = raw["final"][0]
    assert (old.final[0].test, old.final[0].val, old.final[0].val_margin, old.final[0].val_before_finetune) == \
        (top["test_accuracy"], top["val_accuracy"], top["val_accuracy_margin"], top["val_accuracy_before_finetune"])
    as_miou = json.loads(json.dumps(raw).replace("_accuracy", "_miou").replace('"metric": "accuracy"',
                                                                               '"metric": "miou"'))
    assert Summary.from_json(as_miou).final[0].test == top["test_accuracy"]  # any task's metric, not a fixed name


def test_what_this_prunetune_writes_reads_back_equal(old_run, tmp_path):
    old = read_summary(str(old_run))
    write(str(tmp_path), old)
    assert json.load(open(tmp_path / "final" / "summary.json"))["schema_version"] == SCHEMA_VERSION
    assert read_summary(str(tmp_path)) == old
    quantized = summary([final_model(int8=Int8(test_accuracy=0.9, size_mb=0.1, latency_ms_batch1=0.2, written=True,
                                               fp32=OnnxFigures(test_accuracy=0.91, size_mb=0.3, latency_ms_batch1=0.4),
                                               accuracy_drop_points=1.0, path="x.onnx"))])
    write(str(tmp_path), quantized)
    assert read_summary(str(tmp_path)) == quantized
    manifest = read_manifest(str(old_run))
    write(str(tmp_path), manifest)
    assert read_manifest(str(tmp_path)) == manifest and isinstance(manifest, Manifest)
    exports = read_exports(str(old_run))
    write(str(tmp_path), exports)
    assert read_exports(str(tmp_path)) == exports and isinstance(exports, Exports)
    model, record, figures = load_pruned(str(old_run / "final" / "rank1.pt"), raw_input=False)
    assert figures == dataclasses.replace(old.final[0], size_mb=None)  # the file holds what the summary says
    save_pruned(str(tmp_path / "again.pt"), model, record, figures)
    _, record_again, figures_again = load_pruned(str(tmp_path / "again.pt"))
    assert (record_again, figures_again) == (record, figures)


def test_a_run_file_from_a_newer_prunetune_is_refused_in_one_line(old_run):
    data = json.load(open(old_run / "final" / "summary.json"))
    with pytest.raises(RunFileError, match=r"^final/summary.json: schema_version 3 is not one this prunetune reads"):
        Summary.from_json({**data, "schema_version": SCHEMA_VERSION + 1})
    del data["base"]
    with pytest.raises(RunFileError, match=r"^final/summary.json: no base \(not a file this prunetune wrote\?\)$"):
        Summary.from_json(data)
    RunDir(str(old_run)).update(stage="finetune")  # the manifest is rewritten in the new layout, fields kept
    assert read_manifest(str(old_run)).stage == "finetune" and read_manifest(str(old_run)).candidates.rows == 4


def test_only_the_run_files_module_names_the_run_files():
    pattern = re.compile(r"summary\.json|manifest\.json|exports\.json")
    named = [os.path.relpath(os.path.join(d, f), ROOT) for folder in ("search", "workers", "prunetune")
             for d, _, files in os.walk(os.path.join(ROOT, folder)) for f in files
             if f.endswith(".py") and pattern.search(open(os.path.join(d, f)).read())]
    assert named == [os.path.join("search", "runfiles.py")]
