"""Multi-node scheduling on a ray.cluster_utils.Cluster with fake GPUs, and Ray Jobs against a local head."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from prunetune.search.cli import main  # noqa: E402
from prunetune.search.store import CandidateStore  # noqa: E402
from tests.runs import run_args  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_candidates_run_only_on_gpu_nodes(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, num_gpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        code = main(run_args(tmp_path, "resources.gpus_per_trial=0.5", "resources.cpus_per_trial=0.5",
                             "search.max_concurrent_trials=4"))
        assert code == 0
        records = CandidateStore(str(tmp_path / "run")).records()
        assert sorted(r.index for r in records) == list(range(8))
        head = ray.get_runtime_context().get_node_id()[:12]
        nodes = {r.node for r in records}
        # Only the GPU nodes run trials, each holding its Ray GPU. (Whether both nodes get some depends on how fast
        # trials start on a busy machine, so it is not asserted.)
        assert nodes and head not in nodes
        assert all("holds a Ray GPU" in (r.warning or "") for r in records)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_gpu_trials_on_a_cluster_without_gpus_are_refused(tmp_path, capsys):
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        code = main(run_args(tmp_path, "resources.gpus_per_trial=1"))
        assert code == 2
        assert "resources.gpus_per_trial: 1 GPU per trial, but the Ray cluster has 0 GPU" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # refused before anything was written
    finally:
        ray.shutdown()


def _decoys(tmp_path):
    """A directory with a `search.py` and a `workers/` package that fail loudly if anything imports them."""
    decoys = tmp_path / "decoys"
    (decoys / "workers").mkdir(parents=True)
    (decoys / "search.py").write_text("raise SystemExit('the decoy search.py was imported')\n")
    (decoys / "workers" / "__init__.py").write_text("raise SystemExit('the decoy workers/ was imported')\n")
    return decoys


@pytest.mark.slow
def test_a_plain_run_starts_its_own_ray_whatever_ray_address_says_and_no_users_module_shadows_prunetune(tmp_path):
    """One plain `python -m prunetune run` with a stale RAY_ADDRESS (someone else's cluster) in the environment, from
    a folder whose search.py and workers/ (also on PYTHONPATH) would fail if imported."""
    decoys = _decoys(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(decoys), "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "prunetune", *run_args(tmp_path, "ray.num_cpus=2", candidates=2)],
                          cwd=decoys, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decoy" not in proc.stdout + proc.stderr and "best model:" in proc.stdout
    assert "Connecting to existing Ray cluster" not in proc.stderr
    assert "[ray] started an embedded Ray for this run" in proc.stdout  # said once, in our words
    assert "Token authentication is enabled" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import search, sys"], cwd=decoys, env=env, capture_output=True,
                          text=True)
    assert "the decoy search.py was imported" in proc.stderr  # the decoys would be found if anything asked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head(tmp_path):
    """A Ray head started by the test on 127.0.0.1 with token authentication; stopped by its process group."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    token = os.path.expanduser("~/.ray/auth_token")
    if not os.path.isfile(token):
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "get-auth-token", "--generate"],
                       env=env, check=True, capture_output=True)
    port, dash, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    proc = subprocess.Popen(  # every port free, so another Ray on this machine (a second test run) cannot clash
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         "--disable-usage-stats", f"--temp-dir={tempfile.mkdtemp(prefix='rh', dir='/tmp')}"],  # short: socket paths
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_submit_status_logs_against_a_local_head(local_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    deadline = time.time() + 60
    while True:  # the dashboard (job API) comes up a few seconds after the head
        try:
            from prunetune.search.jobs import client

            client(local_head).list_jobs()
            break
        except Exception:
            assert time.time() < deadline, "the local head's job API did not come up"
            time.sleep(1)
    decoys = _decoys(tmp_path)  # the job's working dir holds a search.py and a workers/ package of the user's
    code = main(["submit", *run_args(tmp_path)[1:], "--address", local_head, "--python", sys.executable,
                 "--working-dir", str(decoys)])
    assert code == 0
    out = capsys.readouterr().out
    job_id = out.split()[0]
    assert f"prunetune logs {job_id} --address {local_head} --follow" in out  # the hint works as printed
    deadline = time.time() + 300
    while True:
        assert main(["status", job_id, "--address", local_head]) == 0
        line = capsys.readouterr().out
        if "SUCCEEDED" in line or "FAILED" in line or "STOPPED" in line:
            break
        assert time.time() < deadline, line
        time.sleep(2)
    assert main(["logs", job_id, "--address", local_head]) == 0
    logs = capsys.readouterr().out
    assert main(["status", "nosuchjob", "--address", local_head]) == 2
    assert capsys.readouterr().err.startswith(f"prunetune: error: status: the cluster at {local_head} has no job")
    assert main(["logs", job_id, "--address", local_head]) == 0
    logs = capsys.readouterr().out
    assert "SUCCEEDED" in line, logs[-3000:]
    assert "best model:" in logs
    summary = json.load(open(tmp_path / "run" / "final" / "summary.json"))
    assert len(summary["final"]) == 1
    assert main(["status", str(tmp_path / "run")]) == 0
    assert "stage done" in capsys.readouterr().out
