"""Bad input refused with one clear line and nothing written; locks; storage integrity; safe loading."""
import json
import os
import pickle
import re
import socket
import subprocess
import sys

import pytest
import torch

from prunetune.search.cli import main
from prunetune.search.rundir import RunDir, RunLockedError
from prunetune.search.store import CandidateStore
from prunetune.workers.record import CandidateRecord
from tests.runs import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *overrides):
    return main(run_args(tmp_path, *overrides))


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture
def checkpoints(tmp_path):
    from prunetune import build_model

    good = build_model("digits_cnn", 10, 1).state_dict()
    paths = {"corrupt": tmp_path / "corrupt.pt", "mismatch": tmp_path / "mismatch.pt", "code": tmp_path / "code.pt"}
    torch.save(good, paths["corrupt"])
    paths["corrupt"].write_bytes(paths["corrupt"].read_bytes()[:200])  # cut short
    torch.save(build_model("resnet20", 10).state_dict(), paths["mismatch"])
    torch.save({"weights": _Code()}, paths["code"])
    paths["legacy code"] = tmp_path / "legacy.pt"  # torch's format before 1.6: pickles, no zip
    torch.save({"weights": _Code()}, paths["legacy code"], _use_new_zipfile_serialization=False)
    paths["pickled code"] = tmp_path / "plain.pkl"
    paths["pickled code"].write_bytes(pickle.dumps({"weights": _Code()}, protocol=4))
    return paths


@pytest.mark.parametrize("case, fragment", [
    ("missing", "model.checkpoint: file not found"),
    ("corrupt", "model.checkpoint: cannot read"),
    ("mismatch", "model.checkpoint:"),
    ("code", "model.checkpoint: cannot read"),
    ("legacy code", "model.checkpoint: cannot read"),
    ("pickled code", "model.checkpoint: cannot read"),
])
def test_bad_checkpoints(tmp_path, capsys, checkpoints, case, fragment):
    path = checkpoints.get(case, tmp_path / "nope.pt")
    assert _run(tmp_path, f"model.checkpoint={path}") == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    if case == "mismatch":
        assert "does not match the model" in err
    if case.endswith("code"):  # named, never run, and never the advice to load it with weights_only=False
        assert "pickled objects of posix.system" in err and "pwned" not in err and "weights_only" not in err


def test_a_live_lock_refuses_a_second_run(tmp_path, capsys):
    run = RunDir(str(tmp_path / "run"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(run.path)
        with open(run.lock_path, "w") as f:
            json.dump({"pid": sleeper.pid, "host": socket.gethostname()}, f)
        assert _run(tmp_path, "search.num_candidates=4", "search.top_k=1") == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {sleeper.pid} on {socket.gethostname()}" in err
        with pytest.raises(RunLockedError):
            run.acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    run.acquire()  # its process is gone: the stale lock is cleared and taken
    assert json.load(open(run.lock_path))["pid"] == os.getpid()
    run.release()
    assert not os.path.exists(run.lock_path)


def test_report_skips_a_damaged_part_and_resume_sees_the_checksum(tmp_path, capsys):
    run = RunDir(str(tmp_path / "run"))
    from prunetune.search.config import load_config

    run.create(load_config(), overwrite=False)
    store = CandidateStore(run.path)
    row = dict(ratios=[0.1, 0.2, 0.3, 0.4], kept_units=[1, 2, 3, 4], flops=700000, flops_ratio=0.49, params=30000,
               score=0.9, accuracy=0.9, loss=0.3, bn_recalibrated=True, device="cpu", node="n")
    first = store.append([CandidateRecord(0, **row)])
    second = store.append([CandidateRecord(1, **{**row, "score": 0.8})])
    manifest = run.update(candidates=store.manifest())
    with open(second, "r+b") as f:
        f.truncate(os.path.getsize(second) // 2)  # cut short, as a kill in a non-atomic writer would
    assert main(["report", run.path]) == 0
    out = capsys.readouterr().out
    assert "skipped damaged part" in out and "1 candidates evaluated" in out
    problems = CandidateStore(run.path).verify(manifest.candidates)
    assert problems == [f"{os.path.basename(second)}: checksum differs from the manifest"]
    assert os.path.basename(first) not in " ".join(problems)


# Loads of a pickle the test itself just wrote, in a format that is a pickle by definition (Ultralytics' checkpoints,
# which Ultralytics reads with weights_only=False): allowed by name, nowhere else.
OWN_PICKLES = {"test_yolo.py: torch" ".load(path, weights_only=False)"}  # split: this file is searched too


def test_every_torch_load_is_weights_only():
    offenders = []
    for folder in ("prunetune", "search", "workers", "bench", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                text = open(os.path.join(dirpath, name)).read()
                for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
                    if "weights_only=True" not in call and f"{name}: {call}" not in OWN_PICKLES:
                        offenders.append(f"{name}: {call}")
    assert offenders == []



def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def _write(root, files: dict) -> None:
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "w") as f:
            f.write(text)


USERS = {name: "mine" for name in ("NOTES.txt", "final/rank7.pt", "final/rank1.onnx", "final/rank1.int8.onnx",
                                   "final/rank1.torchscript.pt", "final/rank1.pt.bak", "candidates.parquet/notes.txt")}


def test_overwrite_removes_exactly_the_files_the_run_recorded(tmp_path):
    from prunetune.search.config import load_config

    run = RunDir(str(tmp_path / "run"))
    cfg = load_config(None, [f"output.dir={run.path}", "search.top_k=1"])
    run.create(cfg, overwrite=False)
    ours = ["leaderboard.json", "report.md", "report.png", "final/rank1.pt", "final/summary.json",
            "tune/search/cand-000000/result.json"]
    run.record(*ours[:-1], os.path.join(run.tune_path, "search"))  # relative or absolute, inside the run
    CandidateStore(run.path).append([CandidateRecord(0, [0.1] * 4, score=0.5, flops=1, params=1)])
    _write(run.path, {**{name: "written by the run" for name in ours}, **USERS})
    with pytest.raises(ValueError):
        run.record(str(tmp_path / "elsewhere.txt"))
    run.update(files=run.manifest().files + ["../outside.txt"])  # a hand-edited manifest
    _write(tmp_path, {"outside.txt": "mine"})
    run.create(cfg, overwrite=True)
    assert _files(run.path) == sorted(["config.yaml", "manifest.json", *USERS])
    assert (tmp_path / "outside.txt").read_text() == "mine"
    assert run.manifest().files == []  # the new run has written nothing yet


def test_overwrite_of_a_run_from_before_the_record_removes_only_its_fixed_names(tmp_path):
    from prunetune.search.config import load_config

    run = RunDir(str(tmp_path / "run"))
    cfg = load_config(None, [f"output.dir={run.path}", "search.top_k=2"])
    run.create(cfg, overwrite=False)
    manifest = run.manifest().to_json()
    del manifest["files"], manifest["schema_version"]  # as an older prunetune wrote it
    with open(run.manifest_path, "w") as f:
        json.dump(manifest, f)
    CandidateStore(run.path).append([CandidateRecord(0, [0.1] * 4, score=0.5, flops=1, params=1)])
    ours = ["leaderboard.json", "report.md", "report.png", "report-gamma.png", "latency-table.json",
            "final/rank1.pt", "final/rank2.pt", "final/summary.json", "tune/finetune/rank-1/x.json"]
    _write(run.path, {**{name: "written by the run" for name in ours}, **USERS})
    run.create(cfg, overwrite=True)
    assert _files(run.path) == sorted(["config.yaml", "manifest.json", *USERS])


def test_export_refuses_a_users_file_in_the_default_place_in_one_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from prunetune.search.config import load_config

    run = RunDir(str(tmp_path / "run"))
    run.create(load_config(None, [f"output.dir={run.path}"]), overwrite=False)
    _write(run.path, {"final/rank2.pt": "a model", "final/summary.json": "{}"})  # refused before either is read
    for name, args in (("rank2.onnx", ["--format", "onnx"]), ("rank2.torchscript.pt", ["--format", "torchscript"]),
                       ("rank2.int8.onnx", ["--quantize", "int8"])):
        path = os.path.join(run.final_path, name)
        with open(path, "wb") as f:
            f.write(b"mine\n\x00")
        assert main(["export", run.path, "--rank", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"prunetune: error: export: {path} already exists; prunetune does not overwrite it (it is not "
                       "an export of this run: pass --to another name, or remove it)")
        assert open(path, "rb").read() == b"mine\n\x00"
