"""Fine-tuning: the kept epoch (epoch 0 included), divergence stops it, progress names the stage, the base never sees
the held-out or validation split, parallel batch reading, mixed precision flags."""
import dataclasses
import io
import re
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from prunetune import FinetuneOptions, FinetuneSettings, build_model, finetune, load_config, load_data
from prunetune.search import prepare as prepare_module
from prunetune.workers import finetune as finetune_module
from prunetune.search.config import ConfigError, grace_epochs, loader_workers, training_recipe
from prunetune.search.prepare import base_cache_path, model_spec, trained_base
from prunetune.workers.data import BatchReader, TensorImages, heldout_split
from prunetune.workers.finetune import TrainingDiverged, load_finetuned
from prunetune.workers.selection import kept_epoch
from prunetune.workers.splits import splits_of


@pytest.fixture(scope="module")
def trained():
    """A digits CNN trained 3 epochs on the training split without the held-out images."""
    torch.manual_seed(0)
    data = load_data("digits")
    cfg = load_config(None, ["finetune.batch_size=64"])
    heldout, rest = heldout_split(len(data.train), cfg.evaluation.heldout_size, cfg.evaluation.seed)
    model = build_model("digits_cnn", 10, 1)
    finetune(model, data, replace(training_recipe(cfg), epochs=3),
             FinetuneOptions(train_indices=rest, log=io.StringIO()))
    return data, cfg, model, heldout, rest


def _scrambled(data):
    """The same training images with shuffled labels: training on them can only make a model worse."""
    train = data.train_augmented
    shuffled = torch.from_numpy(np.random.default_rng(0).permutation(train.labels.numpy()))
    return dataclasses.replace(data, train_augmented=TensorImages(
        train.images, shuffled, train.mean.flatten().tolist(), train.std.flatten().tolist(), train.scale, train.pad,
        train.flip, augment=True))


def _copy(model):
    clone = build_model("digits_cnn", 10, 1)
    clone.load_state_dict(model.state_dict())
    return clone


def test_finetuning_that_only_hurts_returns_the_model_it_started_from(trained, tmp_path):
    data, cfg, model, heldout, rest = trained
    student, ckpt = _copy(model), str(tmp_path / "ft.pt")
    ft = replace(cfg.finetune.settings(), epochs=2, lr=0.05)
    log = io.StringIO()
    result = finetune(student, _scrambled(data), ft, FinetuneOptions(train_indices=rest, val_indices=heldout,
                                                                     checkpoint_path=ckpt, log=log))
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert max(h["val_accuracy"] for h in history[1:]) < history[0]["val_accuracy"]  # training made it worse
    assert result["best_epoch"] == 0 and result["best_val_accuracy"] == result["start_val_accuracy"]
    assert result["best_test_accuracy"] == history[0]["test_accuracy"]
    for (k, a), b in zip(model.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k  # the model in memory is the one it started as
    for (k, a), b in zip(model.state_dict().items(), load_finetuned(ckpt).values()):
        assert torch.equal(a, b), k  # and so is what the checkpoint hands to final/rankN.pt
    assert "fine-tuning: kept epoch 0, NOT fine-tuned" in log.getvalue()


def test_finetuning_that_helps_keeps_a_trained_epoch_and_reports_the_best_so_far(trained):
    data, cfg, model, heldout, rest = trained
    reported = []
    result = finetune(_copy(model), data, replace(cfg.finetune.settings(), epochs=3, lr=0.05), FinetuneOptions(
        train_indices=rest, val_indices=heldout, log=io.StringIO(),
        on_epoch=lambda epoch, metrics, path: reported.append(metrics)))
    vals = [h["val_accuracy"] for h in result["history"]]
    assert result["best_epoch"] > 0 and result["best_val_accuracy"] == max(vals) > vals[0]
    # the kept epoch so far: the best fine-tuned one unless epoch 0 beats it beyond the margin (test_selection.py)
    kept = [kept_epoch(vals[:i + 2], "accuracy", len(heldout)) for i in range(3)]
    assert [m["best_epoch"] for m in reported] == kept
    assert [m["best_val_accuracy"] for m in reported] == [vals[k] for k in kept]
    assert all(m["start_val_accuracy"] == vals[0] for m in reported)


def test_a_diverging_training_stops_with_one_line(trained):
    data, cfg, model, _, rest = trained
    ft = replace(cfg.finetune.settings(), lr=1e30, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"^base training: the loss became (nan|inf) at epoch 1/3, step \d+ "):
        finetune(_copy(model), data, ft, FinetuneOptions(train_indices=rest, stage="base training", log=io.StringIO()))


def test_progress_lines_name_the_stage_with_time_per_epoch_and_eta(trained):
    data, cfg, model, heldout, rest = trained
    log = io.StringIO()
    finetune(_copy(model), data, replace(cfg.finetune.settings(), epochs=2),
             FinetuneOptions(train_indices=rest[:200], stage="sparsity training", log=log))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"sparsity training: epoch {i}/2 ") for i, line in
                                   enumerate(lines, 1))
    assert all(" s/epoch, ETA " in line for line in lines) and lines[-1].endswith("ETA 0:00)")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_inside_each_epoch_and_a_file_plain_lines(trained, monkeypatch):
    data, cfg, model, heldout, rest = trained
    monkeypatch.setattr(finetune_module, "BAR_EVERY_S", 0.0)
    short = replace(cfg.finetune.settings(), epochs=1, batch_size=50)
    terminal, plain = _Terminal(), io.StringIO()
    for log in (terminal, plain):
        finetune(_copy(model), data, short, FinetuneOptions(train_indices=rest[:200], stage="base training", log=log))
    shown = terminal.getvalue()
    assert "\rbase training: epoch 1/1 [" in shown and "step 3/4 (epoch ETA " in shown
    assert shown.split("\r\x1b[K")[-1].startswith("base training: epoch 1/1 train_loss")  # cleared, then the line
    assert "\r" not in plain.getvalue() and plain.getvalue().startswith("base training: epoch 1/1 train_loss")


def test_a_log_that_is_no_terminal_gets_plain_lines_inside_an_epoch_only_when_they_are_due(trained, monkeypatch):
    from prunetune.workers import progress

    data, cfg, model, heldout, rest = trained
    short = replace(cfg.finetune.settings(), epochs=1, batch_size=50)
    shown = {}
    for every_s in (0.0, 1e9):
        monkeypatch.setattr(progress, "PROGRESS_EVERY_S", every_s)
        log = io.StringIO()
        finetune(_copy(model), data, short, FinetuneOptions(train_indices=rest[:200], stage="base training", log=log))
        shown[every_s] = log.getvalue().splitlines()
    steps = shown[0.0][:-1]
    assert [line.split(" (epoch ETA ")[0] for line in steps] == [f"base training: epoch 1/1 step {k}/4"
                                                                  for k in (1, 2, 3)]
    assert all(re.fullmatch(r".* \(epoch ETA \d+:\d\d\)", line) for line in steps)
    assert len(shown[1e9]) == 1 and shown[1e9][0].startswith("base training: epoch 1/1 train_loss")
    assert shown[0.0][-1].startswith("base training: epoch 1/1 train_loss")


def test_a_plain_line_comes_a_step_early_when_waiting_for_the_next_step_would_make_it_late(monkeypatch):
    from prunetune.workers import progress

    now, log = [0.0], io.StringIO()
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 10.0)
    monkeypatch.setattr(finetune_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    bar = finetune_module._StepBar(log, "fine-tuning", 2, 5, 100)
    for k, t in enumerate((4, 8, 9, 20, 22), 1):  # steps of 4 s: the line at 8 s, not at 12 s
        now[0] = t
        bar.step(k)
    assert log.getvalue().splitlines() == ["fine-tuning: epoch 2/5 step 2/100 (epoch ETA 6:32)",
                                           "fine-tuning: epoch 2/5 step 4/100 (epoch ETA 8:00)"]


def test_the_progress_bar_fits_the_terminal_so_that_redrawing_it_leaves_no_copy(monkeypatch):
    monkeypatch.setattr(finetune_module, "BAR_EVERY_S", 0.0)
    terminal = _Terminal()  # its size cannot be told: 80 columns
    bar = finetune_module._StepBar(terminal, "sparsity training", 10, 10, 220)  # the longest stage name
    for k in (1, 219, 220):
        bar.step(k)
    drawn = [d.removesuffix("\x1b[K") for d in terminal.getvalue().split("\r")[1:]]
    assert len(drawn) == 3 and drawn[-1].startswith("sparsity training: epoch 10/10 [####################] step")
    assert max(map(len, drawn)) <= 79  # a line of 80 or more wraps, and \r redraws only its last row


def test_the_base_trained_here_never_sees_the_held_out_or_validation_split(tmp_path, monkeypatch):
    cfg = load_config(None, [f"output.cache_dir={tmp_path}", "model.pretrain_epochs=1"])
    data = load_data("digits")
    seen = {}

    def record(model, data, recipe, options):
        seen.update(vars(options), lr=recipe.lr)
        return {"test_accuracy": 0.0}

    monkeypatch.setattr(prepare_module, "finetune", record)
    trained_base(cfg, build_model("digits_cnn", 10, 1), data, io.StringIO())
    splits = splits_of(len(data.train), cfg.evaluation.settings())
    assert sorted(seen["train_indices"]) == sorted(splits.rest)
    assert not set(seen["train_indices"]) & (set(splits.heldout) | set(splits.validation))
    assert seen["stage"] == "base training" and seen["lr"] == cfg.model.pretrain_lr != cfg.finetune.lr
    # another held-out split is another base model
    spec = model_spec(cfg, 10, 1)
    for change in ("evaluation.heldout_size=200", "evaluation.validation_size=200"):
        other = load_config(None, [f"output.cache_dir={tmp_path}", change])
        assert base_cache_path(cfg, spec) != base_cache_path(other, spec)


def test_a_diverging_base_training_caches_nothing(tmp_path):
    cfg = load_config(None, [f"output.cache_dir={tmp_path}", "model.pretrain_epochs=2", "model.pretrain_lr=1e30"])
    data = load_data("digits")
    with pytest.raises(TrainingDiverged, match="^base training: the loss became"):
        trained_base(cfg, build_model("digits_cnn", 10, 1), data, io.StringIO())
    assert not list(tmp_path.iterdir())


class _Numbered(Dataset):
    """Item i is (a 1x2x2 image filled with i, label i % 3): read through DataLoader workers (no get_batch)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), i % 3


def test_persistent_loader_workers_read_each_pass_in_its_own_order():
    reader = BatchReader(_Numbered(), batch_size=8, num_workers=2)
    for seed in (0, 1):
        order = np.random.default_rng(seed).permutation(40)[:32]
        got = [(x[:, 0, 0, 0].long(), y) for x, y in reader(order)]
        assert torch.equal(torch.cat([x for x, _ in got]), torch.as_tensor(order))
        assert torch.equal(torch.cat([y for _, y in got]), torch.as_tensor(order % 3))
    assert reader._loader._iterator is not None  # the same worker processes served both passes


def test_finetune_reads_a_file_dataset_through_workers_like_in_process():
    class Images(_Numbered):
        def __getitem__(self, i):
            return torch.full((1, 8, 8), float(i % 7) / 7), i % 3

    data = load_data("digits")
    files = dataclasses.replace(data, train_augmented=Images(), train=Images(), test=Images())
    ft = FinetuneSettings(batch_size=8, epochs=1)
    results = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model("digits_cnn", 3, 1)
        finetune(model, files, ft, FinetuneOptions(num_workers=workers, log=io.StringIO()))
        results.append(model.state_dict())
    for (k, a), b in zip(results[0].items(), results[1].values()):
        assert torch.equal(a, b), k


def test_bf16_autocast_runs_on_the_cpu_when_asked(trained):
    data, cfg, model, heldout, rest = trained
    ft = load_config(None, ["finetune.amp=bf16", "finetune.channels_last=on", "finetune.epochs=1"]).finetune.settings()
    result = finetune(_copy(model), data, ft, FinetuneOptions(train_indices=rest[:256], val_indices=heldout,
                                                              log=io.StringIO()))
    assert np.isfinite(result["history"][1]["train_loss"])
    assert result["best_val_accuracy"] > 0.5
    with pytest.raises(ConfigError, match="finetune.amp"):
        load_config(None, ["finetune.amp=fp8"])


def test_defaults_derived_from_the_config():
    cfg = load_config(None, [])
    assert grace_epochs(cfg) == 2  # ASHA does not judge the first epoch, which dips
    assert grace_epochs(load_config(None, ["finetune.warmup_epochs=1.5"])) == 4
    assert grace_epochs(load_config(None, ["finetune.grace_epochs=1"])) == 1
    assert grace_epochs(load_config(None, ["finetune.epochs=1"])) == 1
    assert loader_workers(cfg) == 0  # one CPU per trial: read in the trial's process
    assert loader_workers(load_config(None, ["resources.cpus_per_trial=4"])) == 3
    assert loader_workers(load_config(None, ["resources.cpus_per_trial=4", "data.num_workers=1"])) == 1


def test_when_every_finalist_fails_the_error_names_the_first_finalists_cause():
    from types import SimpleNamespace

    from ray.exceptions import RayTaskError

    from prunetune.search.finalize import NoFinalModel, finalize

    def failed(rank, cause):  # a Tune result whose trial raised in its worker: Ray wraps the exception
        error = RayTaskError("finetune_trial", "Traceback (most recent call last):\n  ...", cause)
        return SimpleNamespace(config={"rank": rank}, checkpoint=None, error=error.as_instanceof_cause())

    grid = [failed(2, RuntimeError("injected")), failed(1, TrainingDiverged(
        "fine-tuning: the loss became nan at epoch 1/5, step 3 (lr 1e+03)\nmore detail"))]
    with pytest.raises(NoFinalModel) as e:
        finalize(SimpleNamespace(cfg=None), None, [None, None], grid, [])
    assert str(e.value) == ("fine-tuning produced no model (every fine-tuning trial failed; finalist 1: "
                            "TrainingDiverged: fine-tuning: the loss became nan at epoch 1/5, step 3 (lr 1e+03))")
