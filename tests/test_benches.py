"""Every bench/ script runs end to end in its --smoke mode, and leaves the committed figures alone."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.bench]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))
                 if os.path.basename(p) not in ("common.py", "__init__.py"))
assert BENCHES, "no bench/*.py script found"
COMMITTED = [os.path.join(ROOT, "bench", "results"), os.path.join(ROOT, "bench", "checkpoints")]


def listing(folders: list[str]) -> dict[str, tuple[int, int, str]]:
    """Every file under the folders: relative path -> (size, mtime in ns, sha256)."""
    files = {}
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                stat = os.stat(path)
                files[os.path.relpath(path, ROOT)] = (stat.st_size, stat.st_mtime_ns, digest)
    return files


STARTS_RAY = ("scale.py", "tune_overhead.py", "versus.py", "yolo_chain.py")  # yolo_chain: where ultralytics imports


def versus_rows(out: str) -> None:
    """bench/versus.py's smoke: every method of the comparison has a row per recipe, fine-tuned once per seed, within
    the FLOPs budget (the Torch-Pruning rows at or under it, as they step until they reach it)."""
    sys.path.insert(0, ROOT)
    from bench.versus import RECIPES, TORCH_PRUNING

    with open(os.path.join(out, "versus.json")) as f:
        result = json.load(f)
    (budget,) = result["budgets"]
    rows = {(r["method"], r["recipe"]): r for r in budget["rows"]}
    methods = {m for m, _ in rows}
    tp_rows = {name for name, *_ in TORCH_PRUNING.values()}
    assert tp_rows | {"prunetune uniform", "random valid strategy"} < methods, methods
    assert any(m.startswith("prunetune search") for m in methods), methods
    assert {r for _, r in rows} == set(RECIPES)
    (searched,) = (r for (m, _), r in rows.items() if m.startswith("prunetune search") and r["recipe"] == "reference")
    assert len(searched["finalists"]) == result["args"]["seeds"]
    for runs, test in zip(searched["finalists"], searched["test"]):  # the finalist best on validation is the row's
        assert len(runs) == result["args"]["finalists"] and test == max(runs, key=lambda r: r["val"])["test"]
    for (method, _), row in rows.items():
        assert len(row["test"]) == result["args"]["seeds"] and all(0 <= t <= 1 for t in row["test"]), row
        limit = 100 * budget["target"] + (0 if method in tp_rows else 1)  # search.tolerance 0.01
        assert 0 < row["flops_pct"] <= limit, row


CHECKS = {"versus.py": versus_rows}  # what a script's smoke output must hold, beyond running


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.ray) if s in STARTS_RAY else s
                                    for s in BENCHES])
def test_bench_smoke_runs_and_leaves_results_alone(script, tmp_path):
    before = listing(COMMITTED)
    env = {**os.environ, "PRUNETUNE_BENCH_SMOKE_DIR": str(tmp_path / "out")}
    try:
        proc = subprocess.run([sys.executable, os.path.join("bench", script), "--smoke"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        output = [out.decode(errors="replace") if isinstance(out, bytes) else out or "" for out in (e.stdout, e.stderr)]
        pytest.fail(f"bench/{script} --smoke ran past 300 s:\n{output[0][-3000:]}\n{output[1][-3000:]}")
    assert proc.returncode == 0, (f"bench/{script} --smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    assert listing(COMMITTED) == before, f"bench/{script} --smoke changed bench/results or bench/checkpoints"
    assert os.listdir(tmp_path / "out"), f"bench/{script} --smoke wrote nothing to its smoke directory"
    if script in CHECKS:
        CHECKS[script](str(tmp_path / "out"))
