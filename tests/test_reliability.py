"""Reliability without Ray: bad input refused in one line (never a traceback), nothing of the user's deleted or
overwritten, read-only commands write nothing, and the cheap checks before anything expensive."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from prunetune import load_config
from prunetune.search.cli import main
from prunetune.search.rundir import RunDir
from prunetune.search.runfiles import StoredParts, Timings, write
from prunetune.search.store import CandidateStore
from prunetune.workers.record import CandidateRecord
from tests.bad_values import BAD_INPUTS
from tests.summaries import summary, timings
from tests.faults import ROOT, sigint_as_in_a_terminal
from tests.runs import as_args, run_args


def _one_line_exit_2(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("prunetune: error: ") and fragment in err and len(err.splitlines()) == 1, err


def _imagefolder(root, bad_name, bad_bytes):
    for cls in ("a", "b"):
        os.makedirs(root / "train" / cls)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "train" / cls / f"{i}.png")
    (root / "train" / "a" / bad_name).write_bytes(bad_bytes)
    return root


@pytest.mark.parametrize("what, overrides, fragment", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, what, overrides, fragment):
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "dir").mkdir()
    folders = {"broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "notes.png": b"meeting notes\n"}
    values = {"{file}": str(tmp_path / "file"), "{dir}": str(tmp_path / "dir")}
    for name, content in folders.items():
        values[f"{{folder:{name}}}"] = str(_imagefolder(tmp_path / name, name, content))
    overrides = [o for o in overrides]
    for key, value in values.items():
        overrides = [o.replace(key, value) for o in overrides]
        fragment = fragment.replace(key, value)
    before = sorted(os.listdir(tmp_path))
    _one_line_exit_2(capsys, run_args(tmp_path, *overrides), fragment)
    assert sorted(os.listdir(tmp_path)) == before  # no run directory, no cache


@pytest.mark.parametrize("content, fragment", [
    (b"search:\n  target: 0.4\n  target: 0.5\n", "duplicate key 'target'"),
    (b"search:\n  target: 0.4 \xff\n", "is not UTF-8 text"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    _one_line_exit_2(capsys, ["run", str(path), *as_args([f"output.dir={tmp_path / 'run'}"])], fragment)
    _one_line_exit_2(capsys, ["run", str(tmp_path), *as_args([f"output.dir={tmp_path / 'run'}"])],
                     f"config: {tmp_path} is a directory, not a YAML file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "--model", "resnet20", "--input-shape", "a,b,c"], "--input-shape: expected C,H,W"),
    (["inspect", "--model", "resnet20", "--input-shape", "1,2"], "--input-shape: expected C,H,W"),
    (["inspect", "--model", "resnet20", "--num-classes", "0"], "--num-classes: 0 is not allowed"),
    (["inspect", "--model", "resnet20", "--round-to", "0"], "--round-to: 0 is not allowed"),
])
def test_bad_inspect_arguments_are_one_line(capsys, argv, fragment):
    _one_line_exit_2(capsys, argv, fragment)


def test_settings_that_mean_nothing_or_open_the_dashboard_are_warned_about():
    from prunetune.search.config import config_warnings

    warned = config_warnings(load_config(None, ["data.path=/data", "ray.dashboard=true", "ray.dashboard_host=0.0.0.0"]))
    assert warned == ["data.path is ignored for data set 'digits'",
                      "ray.dashboard_host: 0.0.0.0 opens Ray's dashboard and job API to the network; anyone who "
                      "reaches it can run code on this machine"]
    assert config_warnings(load_config()) == []


def _finished_looking_run(tmp_path) -> RunDir:
    """A run directory with every kind of file a run writes (no search needed to test what removes them)."""
    run = RunDir(str(tmp_path / "run"))
    run.create(load_config(None, [f"output.dir={run.path}"]), overwrite=False)
    part = CandidateStore(run.path).append([CandidateRecord(0, [0.1] * 4, score=0.5, flops=1, params=1)])
    run.update(candidates=StoredParts(rows=1, parts={os.path.basename(part): "x"}), stage="done")
    run.record("leaderboard.json", "report.md", "report.png", "final/rank1.pt", "final/summary.json", "tune/search")
    for name in ("leaderboard.json", "report.md", "report.png"):
        (tmp_path / "run" / name).write_text("written by the run")
    os.makedirs(os.path.join(run.final_path))
    (tmp_path / "run" / "final" / "rank1.pt").write_text("written by the run")
    write(run.path, summary([]))
    os.makedirs(os.path.join(run.tune_path, "search", "cand-000000"))
    return run


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, capsys):
    run = _finished_looking_run(tmp_path)
    (tmp_path / "run" / "NOTES.txt").write_text("mine")
    (tmp_path / "run" / "my_data").mkdir()
    (tmp_path / "run" / "my_data" / "x.csv").write_text("mine")
    (tmp_path / "run" / "final" / "my_export.onnx").write_text("mine")
    run.create(load_config(None, [f"output.dir={run.path}"]), overwrite=True)
    left = sorted(os.path.relpath(os.path.join(d, f), run.path) for d, _, files in os.walk(run.path) for f in files)
    assert left == ["NOTES.txt", "config.yaml", "final/my_export.onnx", "manifest.json", "my_data/x.csv"]


@pytest.mark.parametrize("files, fragment", [
    ({"manifest.json": '{"tool": "webpack", "version": 5}', "src/app.js": "x", "index.html": "x"},
     "manifest.json was not written by prunetune"),
    ({"manifest.json": "not json at all", "index.html": "x"}, "manifest.json is not a prunetune run manifest"),
    ({"src/app.js": "x", "index.html": "x"}, "is not empty and holds no prunetune run"),
])
def test_overwrite_never_touches_a_directory_that_is_not_a_run(tmp_path, capsys, files, fragment):
    out = tmp_path / "site"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    _one_line_exit_2(capsys, ["run", *as_args([f"output.dir={out}", f"output.cache_dir={tmp_path / 'cache'}"]),
                              "--overwrite"], fragment)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == set(files)


@pytest.mark.parametrize("command", ["report", "status", "resume"])
def test_a_manifest_that_is_not_ours_is_one_line_for_every_command(tmp_path, capsys, command):
    (tmp_path / "manifest.json").write_text("{ not json")
    _one_line_exit_2(capsys, [command, str(tmp_path)], "manifest.json is not a prunetune run manifest")
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_read_only_commands_write_nothing_and_name_a_missing_run(tmp_path, capsys):
    _one_line_exit_2(capsys, ["status", str(tmp_path)], "holds no prunetune run")
    _one_line_exit_2(capsys, ["report", str(tmp_path)], "holds no prunetune run")
    _one_line_exit_2(capsys, ["status", str(tmp_path / "runs" / "defualt")], "holds no prunetune run")
    assert os.listdir(tmp_path) == []
    run = _finished_looking_run(tmp_path)
    before = {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(run.path) for p in files}
    assert main(["status", run.path]) == 0 and main(["report", run.path]) == 0
    assert {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(run.path) for p in files} == before


def test_report_says_which_stored_candidates_are_missing(tmp_path, capsys):
    run = _finished_looking_run(tmp_path)
    for part in CandidateStore(run.path).parts():
        os.remove(part)
    assert main(["report", run.path]) == 0
    out = capsys.readouterr().out
    assert "listed in the manifest but missing" in out and "evaluates its candidates again" in out
    assert "the manifest records 1 stored candidates, 1 of them are missing" in out


@pytest.mark.slow  # starts `prunetune run` and trains until the first epoch: 11 s here
def test_ctrl_c_while_the_base_model_trains_says_nothing_was_written(tmp_path):
    args = run_args(tmp_path, "model.pretrain_epochs=500")
    proc = subprocess.Popen([sys.executable, "-m", "prunetune", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    deadline = time.time() + 120
    for line in proc.stderr:  # the interrupt must land while the base model trains
        if "base training: epoch 1/500" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "prunetune: interrupted before the run started; nothing was written" in err
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("base-*.pt"))


def test_an_address_where_no_cluster_answers_is_refused_in_seconds(tmp_path, capsys):
    started = time.monotonic()
    _one_line_exit_2(capsys, [*run_args(tmp_path), "--address", "127.0.0.1:1"],
                     "--address: no Ray cluster answers at 127.0.0.1:1")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    assert time.monotonic() - started < 60  # refused before the base model is trained


def test_an_embedded_ray_that_never_starts_is_tried_again_then_refused_in_one_line(tmp_path, capsys, monkeypatch):
    import ray

    from prunetune.search.cluster import START_TRIES

    tries = []

    def timed_out(**kwargs):  # Ray's own exception when its raylet does not register within 30 s
        tries.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", timed_out)
    assert main(run_args(tmp_path)) == 1
    captured = capsys.readouterr()
    assert len(tries) == START_TRIES > 1 and captured.out.count("trying again") == START_TRIES - 1
    assert captured.err.startswith("prunetune: ray: the embedded Ray did not start") and \
        len(captured.err.strip().splitlines()) == 1 and "--address" in captured.err, captured.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dashboard", [False, True])
def test_the_api_servers_start_up_errors_are_dropped_when_the_dashboard_is_off(dashboard, monkeypatch):
    import logging
    from types import SimpleNamespace

    import ray

    from prunetune.search.cluster import connect

    logger, shown = logging.getLogger("ray._private.services"), logging.Handler()
    shown.emit = lambda record: messages.append(record.getMessage())
    messages = []

    def start_api_server():  # as Ray's services.py logs a slow API server, whose start ray.init does not need
        logger.error("Failed to start the dashboard , return code 1")

    def init(**kwargs):
        start_api_server()
        return SimpleNamespace(dashboard_url="")

    monkeypatch.setattr(ray, "init", init)
    logger.addHandler(shown)
    try:
        assert connect(load_config(None, [f"ray.dashboard={str(dashboard).lower()}"]))
    finally:
        logger.removeHandler(shown)
    assert messages == (["Failed to start the dashboard , return code 1"] if dashboard else [])


_SLOW_RAY_START = """
import os, signal, sys, time
import ray
import ray._private.utils
from prunetune.search.cli import main

def slow_init(**kwargs):  # as ray.init: its own SIGTERM handler first, then a start-up that takes long
    ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
    os.kill(os.getpid(), {signum})
    time.sleep(600)

ray.init = slow_init
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_embedded_ray_starts_ends_the_run_in_one_line(tmp_path, signum):
    code = _SLOW_RAY_START.format(signum=int(signum), argv=run_args(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=sigint_as_in_a_terminal)  # generous: the 600 s start-up must not be waited for
    how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"prunetune: {how} before the run started; nothing was written", proc.stderr
    assert not (tmp_path / "run").exists()


def test_report_and_status_do_not_import_ray_tune(tmp_path):
    run = _finished_looking_run(tmp_path)
    code = ("import sys; from prunetune.search.cli import main; "
            f"assert main(['report', {run.path!r}]) == 0 and main(['status', {run.path!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith('ray')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_gpus_declared_for_an_embedded_ray_must_exist(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    checkpoint = _digits_checkpoint(tmp_path)  # no base model to train: the refusal comes in seconds
    _one_line_exit_2(capsys, run_args(tmp_path, "ray.num_gpus=2", f"model.checkpoint={checkpoint}"),
                     "ray.num_gpus: 2 GPU declared, but torch sees 0 CUDA device on this machine")
    assert not (tmp_path / "run").exists()


def _digits_checkpoint(tmp_path):
    from prunetune import build_model

    path = tmp_path / "digits.pt"
    torch.save(build_model("digits_cnn", 10, 1).state_dict(), path)
    return path


def test_a_torchvision_that_does_not_import_gets_the_line_that_installs_the_right_one(tmp_path):
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    proc = subprocess.run([sys.executable, "-m", "prunetune", "inspect", "--model", "torchvision.models:resnet18"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
                          timeout=120)
    minor = int(torch.__version__.split(".")[1])
    index = " --index-url https://download.pytorch.org/whl/cpu" if "+cpu" in torch.__version__ else ""
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "prunetune: error: model.name: cannot import module 'torchvision.models' (operator torchvision::nms does not "
        f"exist); torchvision must be the build that matches torch {torch.__version__}: pip install "
        f"'torchvision==0.{minor + 15}.*'{index}")


def test_a_report_read_by_a_closed_pipe_ends_quietly(tmp_path):
    run = _finished_looking_run(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "prunetune", "report", run.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `prunetune report RUN | head -1` does once head has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_latency_whose_spread_is_large_is_marked_unstable():
    from prunetune.search.report import _latency

    assert _latency(Timings(**timings(2.0, 0.2))) == "2 ms ± 0.1"
    assert _latency(Timings(**timings(2.0, 1.0))) == "2 ms ± 0.5 (unstable)"


_INTERRUPTED_INSIDE = """
import os, signal, sys, time
import {module} as target
from prunetune.search.cli import main

def interrupted(*args, **kwargs):  # the signal lands while the command works
    os.kill(os.getpid(), {signum})
    time.sleep(60)

target.{function} = interrupted
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("module, function, argv", [
    ("prunetune.workers.latency", "build_table", ["inspect", "--model", "resnet20", "--latency"]),
    ("prunetune.search.quantize", "quantize_int8", ["export", "RUN", "--quantize", "int8"]),
], ids=["inspect --latency", "export --quantize"])
def test_an_interrupted_export_or_inspect_says_so_in_one_line(tmp_path, signum, module, function, argv):
    argv = [*argv, "--set", f"output.cache_dir={tmp_path / 'cache'}"] if argv[0] == "inspect" else \
        [_finished_looking_run(tmp_path).path if a == "RUN" else a for a in argv]
    code = _INTERRUPTED_INSIDE.format(module=module, function=function, signum=int(signum), argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=sigint_as_in_a_terminal)
    how = "interrupted" if signum == signal.SIGINT else "interrupted by SIGTERM"
    assert proc.returncode == 128 + signum and proc.stderr.strip() == f"prunetune: {how}", proc.stderr[-2000:]


def test_inspect_latency_with_a_cache_it_cannot_write_is_refused_before_timing(capsys, monkeypatch):
    from prunetune.workers import latency

    def build_table(*args, **kwargs):
        raise AssertionError("the table was timed although it could not be cached")

    monkeypatch.setattr(latency, "build_table", build_table)
    _one_line_exit_2(capsys, ["inspect", "--model", "resnet20", "--latency", "--set",
                              "output.cache_dir=/proc/prunetune-test"],
                     "output.cache_dir: cannot write the latency table to /proc/prunetune-test/latency")


def test_the_embedded_rays_token_is_created_readable_by_this_user_only(tmp_path, monkeypatch):
    from prunetune.search.cluster import _private_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _private_token()
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    token.write_text("the user's own")
    token.chmod(0o644)
    _private_token()  # an existing token stays as it is
    assert token.read_text() == "the user's own" and token.stat().st_mode & 0o777 == 0o644
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "other"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user decides: nothing is created
    _private_token()
    assert not (tmp_path / "other" / ".ray").exists()
