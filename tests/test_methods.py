"""The other pruning methods: Network Slimming's sparsity training (and, as they land, unstructured, stripes)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from prunetune.search.config import ConfigError, load_config
from prunetune.search.prepare import ensure_base, prepare, trained_base
from prunetune.workers.data import load_data
from prunetune.workers.finetune import finetune
from prunetune.workers.models import build_model
from prunetune.workers.sparsity import gamma_histogram
from tests.runs import small


def _gammas(model) -> np.ndarray:
    return torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]).numpy()


def test_the_l1_penalty_drives_batchnorm_scales_down():
    data = load_data("digits")
    cfg = load_config(None, ["finetune.batch_size=128"]).finetune
    plain, slim = (build_model("digits_cnn", 10, 1) for _ in range(2))
    slim.load_state_dict(plain.state_dict())
    finetune(plain, data, cfg, epochs=2)
    finetune(slim, data, cfg, epochs=2, bn_l1=3e-2)
    assert np.median(_gammas(slim)) < np.median(_gammas(plain)) - 0.05
    assert _gammas(slim).max() < _gammas(plain).min()  # every scale pulled towards zero


class _Stop(Exception):
    pass


def test_sparsity_training_runs_after_the_base_is_cached_and_resumes(tmp_path, capsys):
    cfg = load_config(None, small(tmp_path / "run", tmp_path / "cache", "model.sparsity=5e-3",
                                  "model.sparsity_epochs=2", "search.criterion=bn_scale"))
    prep = prepare(cfg)
    ensure_base(prep)
    first = prep.sparsity
    assert first["gamma_after"]["median"] < first["gamma_before"]["median"]
    assert prep.base_checkpoint == first["checkpoint"] and first["checkpoint"].startswith(str(tmp_path / "cache"))
    trained = {k: v.clone() for k, v in prep.model.state_dict().items()}
    os.remove(first["checkpoint"])  # as if interrupted after its first epoch:
    interrupted = prepare(cfg)
    trained_base(cfg, interrupted.model, interrupted.data)

    def stop(epoch, metrics, path):
        raise _Stop

    with pytest.raises(_Stop):
        finetune(interrupted.model, interrupted.data, cfg.finetune, checkpoint_path=first["checkpoint"] + ".resume",
                 epochs=2, bn_l1=5e-3, on_epoch=stop)
    capsys.readouterr()
    prep = prepare(cfg)
    ensure_base(prep)
    assert "fine-tune: resumed after epoch 1 of 2" in capsys.readouterr().err
    assert all(torch.equal(trained[k], v) for k, v in prep.model.state_dict().items())
    assert not os.path.exists(first["checkpoint"] + ".resume")
    prep = prepare(cfg)
    ensure_base(prep)
    assert "sparsity training: loaded" in capsys.readouterr().err


@pytest.mark.parametrize("setting, key", [("model.sparsity=1e-4", "model.sparsity"),
                                          ("search.criterion=bn_scale", "search.criterion")])
def test_batchnorm_methods_on_a_model_without_batchnorm_are_refused_in_one_line(tmp_path, setting, key):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"output.cache_dir={tmp_path / 'cache'}",
                             "model.name=tests.archs:no_batchnorm", setting])
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    assert str(e.value) == (f"{key}: tests.archs:no_batchnorm has no BatchNorm layer with a scale (gamma); Network "
                            "Slimming and bn_scale need one (use search.criterion: l1)")
