"""The README's Python API example runs as written (so it cannot drift from the code); the checkpoints it
describes load."""
import os
import re
import subprocess
import sys

import pytest

from tests.faults import ROOT


@pytest.mark.slow
def test_the_python_api_example_runs(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"candidate (\d): ([\d.]+)% of the FLOPs, held-out accuracy ([\d.]+)", proc.stdout)
    assert [int(i) for i, _, _ in lines] == [0, 1, 2]
    assert all(38.0 <= float(flops) <= 42.0 and 0.3 < float(acc) <= 1.0 for _, flops, acc in lines)
    assert "4 groups; not pruned: fc (classifier first)" in proc.stdout
    assert "so the column sums to more than 100%" in proc.stdout  # inspect's FLOPs share says what it is


def test_the_committed_cifar_checkpoints_load_into_the_models_they_name():
    import glob
    import json

    import torch

    from prunetune import build_model
    from prunetune.workers.models import load_checkpoint

    paths = sorted(glob.glob(os.path.join(ROOT, "bench", "checkpoints", "*-cifar10.pt")))
    assert [os.path.basename(p) for p in paths] == ["resnet20-cifar10.pt", "resnet56-cifar10.pt"]
    for path in paths:
        about = json.load(open(path[:-3] + ".json"))
        assert about["model"] in os.path.basename(path) and 0.8 < about["test_accuracy"] < 1.0  # what the README says
        model = build_model(about["model"], 10, 3)
        load_checkpoint(model, path)  # every tensor present with its shape, read with weights_only
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()
