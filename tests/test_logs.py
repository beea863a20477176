"""What prunetune says goes through the `prunetune` logger (quiet on request, redirectable); one error family."""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

from prunetune.workers.errors import BadInput, PrunetuneError, RunFailed
from tests.faults import ROOT
from tests.test_walls import modules

# The Python API example (docs/snippets/python_api.py), shortened: base training, preflight, one candidate.
API = """
import logging, sys, torch
from prunetune import (CandidateEvaluator, EvaluationSettings, FinetuneOptions, FinetuneSettings, PreflightOptions,
                       StrategySampler, build_model, finetune, load_data, preflight)
from prunetune.search.prepare import warn
{setup}
torch.manual_seed(0)
data = load_data("digits")
model = build_model("digits_cnn", data.num_classes, in_channels=1)
finetune(model, data, FinetuneSettings(epochs=1, lr=0.05, warmup_epochs=1), FinetuneOptions(train_indices=range(300)))
verdict = preflight(model, data.example_input(), PreflightOptions(
    data.num_classes, max_ratio=0.7, first=lambda space: StrategySampler(space, 0.4, 0.02, 0.7).sample(0)))
evaluator = CandidateEvaluator(model, verdict.space, data, EvaluationSettings(), device="cpu")
evaluator.evaluate(StrategySampler(verdict.space, 0.4, 0.02, 0.7, seed=0).sample(0), index=0)
warn("a warning from the API")
"""


def _api(setup: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", API.format(setup=setup)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_python_api_prints_nothing_once_the_logger_is_set_to_errors_and_its_lines_can_be_redirected():
    loud = _api("")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "fine-tuning: epoch 1/1 " in loud.stderr and "prunetune: warning: a warning from the API" in loud.stderr
    quiet = _api('logging.getLogger("prunetune").setLevel(logging.ERROR)')
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert (quiet.stdout, quiet.stderr) == ("", "")
    redirected = _api('logging.getLogger("prunetune").handlers[:] = [logging.StreamHandler(sys.stdout)]')
    assert redirected.returncode == 0 and redirected.stderr == "", redirected.stderr[-2000:]
    assert "fine-tuning: epoch 1/1 " in redirected.stdout and "a warning from the API" in redirected.stdout


OPTIONAL_PACKAGES = {"ultralytics"}  # the modules that import them exist for users who have them


def test_every_error_prunetune_raises_is_of_one_family_whose_branch_gives_the_exit_status():
    errors = []
    for name in [m for m in modules() if not m.endswith("__main__")]:  # __main__ runs the command
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name in OPTIONAL_PACKAGES:  # a module of an extra (prunetune.yolo: ultralytics) that is not here
                continue
            raise
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name and not cls_name.startswith("_"):
                errors.append(cls)
    assert {"ConfigError", "DataError", "SearchFailed", "TrainingDiverged", "DiskFull"} <= {c.__name__ for c in errors}
    assert [c.__name__ for c in errors if not issubclass(c, PrunetuneError)] == []
    assert all(c.exit_code == 2 for c in errors if issubclass(c, BadInput))
    assert all(c.exit_code == 1 for c in errors if issubclass(c, RunFailed))
