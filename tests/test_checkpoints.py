"""Checkpoints as users have them (compiled, Lightning, DDP, training checkpoints, safetensors), refused ones in
one line, and cached base models verified by their checksum."""
import argparse
import os

import pytest
import torch

from prunetune.search.cli import main
from prunetune.search.config import load_config
from prunetune.search.prepare import base_cache_path, model_spec, prepare, trained_base
from prunetune.workers.data import load_data
from prunetune.workers.models import ModelError, build_model, load_checkpoint
from tests.archs import FlattenCNN, randomize_batchnorm
from tests.runs import run_args

NET = "tests.archs:FlattenCNN"  # a small digits-sized net with BatchNorm (num_batches_tracked buffers)


@pytest.fixture
def trained():
    """A FlattenCNN whose weights differ from a freshly built one's (what a load must reproduce exactly)."""
    torch.manual_seed(1)
    return randomize_batchnorm(FlattenCNN(), seed=1)


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _safetensors(path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


LAYOUTS = {  # how each tool writes a checkpoint: (file name, writer, what the load says it did)
    "torch.compile": ("compiled.pt", lambda sd, p: torch.save(_prefixed(sd, "_orig_mod."), p),
                      "prefix '_orig_mod.' removed"),
    "lightning": ("last.ckpt", lambda sd, p: torch.save(
        {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": _prefixed(sd, "model."),
         "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}], "loops": {},
         "hyper_parameters": {"lr": 0.1}}, p), "loaded 'state_dict' from {path}, prefix 'model.' removed"),
    "lightning+compile": ("compiled.ckpt",
                          lambda sd, p: torch.save({"state_dict": _prefixed(sd, "model._orig_mod.")}, p),
                          "loaded 'state_dict' from {path}, prefix 'model._orig_mod.' removed"),
    "DataParallel/DDP": ("ddp.pt", lambda sd, p: torch.save(_prefixed(sd, "module."), p), "prefix 'module.' removed"),
    "epoch+state_dict": ("epoch9.pt", lambda sd, p: torch.save({"epoch": 9, "state_dict": sd, "best_acc1": 0.9}, p),
                         "loaded 'state_dict' from {path}"),
    "model+optimizer+args": ("checkpoint.pth", lambda sd, p: torch.save(
        {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9,
         "args": argparse.Namespace(lr=0.1, data_path="/data")}, p), "loaded 'model' from {path}"),
    "model_ema only": ("ema.pth", lambda sd, p: torch.save({"model_ema": sd, "epoch": 9}, p),
                       "loaded 'model_ema' from {path}"),
    "safetensors": ("model.safetensors", lambda sd, p: _safetensors(p, sd), ""),
    "safetensors, other name, DDP": ("weights.bin", lambda sd, p: _safetensors(p, _prefixed(sd, "module.")),
                                     "prefix 'module.' removed"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_checkpoint_layout_loads_exactly_and_says_what_was_done(tmp_path, trained, layout):
    if "safetensors" in layout:
        pytest.importorskip("safetensors")
    name, write, said = LAYOUTS[layout]
    path = tmp_path / name
    write(trained.state_dict(), path)
    model = FlattenCNN()
    done = load_checkpoint(model, str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())
    assert said.format(path=path) in done and "\n" not in done
    if not said:
        assert done == ""  # a plain state dict loads without a word


def test_the_run_prints_what_it_did_with_a_lightning_checkpoint(tmp_path, trained, capsys):
    path = tmp_path / "last.ckpt"
    LAYOUTS["lightning"][1](trained.state_dict(), path)
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"output.cache_dir={tmp_path / 'cache'}",
                             f"model.name={NET}", f"model.checkpoint={path}"])
    prep = prepare(cfg)
    assert f"model.checkpoint: loaded 'state_dict' from {path}, prefix 'model.' removed\n" in capsys.readouterr().err
    assert all(torch.equal(v, prep.model.state_dict()[k]) for k, v in trained.state_dict().items())


def test_two_fitting_state_dicts_are_refused_naming_both_and_the_key_chooses(tmp_path, trained):
    path = tmp_path / "both.pth"
    ema = randomize_batchnorm(FlattenCNN(), seed=2)
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict(), "epoch": 9}, path)
    with pytest.raises(ModelError) as e:
        load_checkpoint(FlattenCNN(), str(path))
    assert str(e.value) == (f"model.checkpoint: {path} holds 2 state dicts that fit the model ('model', 'model_ema'); "
                            "choose one with model.checkpoint_key (e.g. --set model.checkpoint_key=model_ema)")
    model = FlattenCNN()
    assert load_checkpoint(model, str(path), "model_ema") == f"loaded 'model_ema' from {path}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.state_dict().items())
    with pytest.raises(ModelError, match=r"^model.checkpoint_key: .* has no state dict 'ema'; those that fit the "
                                         r"model: 'model', 'model_ema'$"):
        load_checkpoint(FlattenCNN(), str(path), "ema")


def test_two_fitting_prefixes_in_one_entry_are_named_with_dots(tmp_path, trained):
    path = tmp_path / "ema.ckpt"  # a LightningModule holding the model and an EMA copy of it
    ema = randomize_batchnorm(FlattenCNN(), seed=2)
    torch.save({"state_dict": {**_prefixed(trained.state_dict(), "model."),
                               **_prefixed(ema.state_dict(), "ema_model.")}}, path)
    with pytest.raises(ModelError, match=r"fit the model \('state_dict.ema_model', 'state_dict.model'\); choose"):
        load_checkpoint(FlattenCNN(), str(path))
    model = FlattenCNN()
    done = load_checkpoint(model, str(path), "state_dict.ema_model")
    assert done == (f"loaded 'state_dict' from {path}, prefix 'ema_model.' removed, the other 18 tensors "
                    "in it ignored")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.state_dict().items())


def test_the_checkpoint_key_is_a_config_key_and_a_refusal_is_one_line_before_anything_runs(tmp_path, trained,
                                                                                          capsys):
    path = tmp_path / "both.pth"
    torch.save({"state_dict": trained.state_dict(), "state_dict_ema": trained.state_dict()}, path)
    assert main(run_args(tmp_path, f"model.name={NET}", f"model.checkpoint={path}")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.checkpoint_key=state_dict_ema" in err
    assert not (tmp_path / "run").exists()
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"output.cache_dir={tmp_path / 'cache'}",
                             f"model.name={NET}", f"model.checkpoint={path}", "model.checkpoint_key=state_dict"])
    prepare(cfg)
    assert f"model.checkpoint: loaded 'state_dict' from {path}\n" in capsys.readouterr().err


def test_a_checkpoint_lacking_only_num_batches_tracked_loads(tmp_path, trained):
    state = trained.state_dict()  # torch's OrderedDict, with its version metadata
    for k in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[k]
    torch.save(state, tmp_path / "old.pt")
    model = FlattenCNN()
    done = load_checkpoint(model, str(tmp_path / "old.pt"))
    assert done == f"loaded {tmp_path / 'old.pt'}, 2 absent num_batches_tracked buffers kept as built"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _refused(tmp_path, capsys, path, *extra) -> str:
    """Run with `path` as model.checkpoint: exit 2, one line, no run directory, Ray never started."""
    import ray

    assert main(run_args(tmp_path, f"model.name={NET}", f"model.checkpoint={path}", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "\x1b" not in err
    assert not (tmp_path / "run").exists() and not ray.is_initialized()
    return err


def test_a_whole_pickled_model_is_refused_in_one_clean_line(tmp_path, capsys, trained):
    torch.save(trained, tmp_path / "whole.pt")
    err = _refused(tmp_path, capsys, tmp_path / "whole.pt")
    assert err == (f"prunetune: error: model.checkpoint: {tmp_path / 'whole.pt'} holds a whole pickled model "
                   "(tests.archs.FlattenCNN), not a state dict; save the weights with "
                   "torch.save(model.state_dict(), path) and give that file")


def test_a_checkpoint_with_non_finite_weights_is_refused_before_ray_starts(tmp_path, capsys, trained):
    state = trained.state_dict()
    state["hidden.weight"][3, 5] = float("nan")
    state["features.1.running_var"][0] = float("inf")
    torch.save({"model": state}, tmp_path / "nan.pt")
    err = _refused(tmp_path, capsys, tmp_path / "nan.pt")
    assert err == (f"prunetune: error: model.checkpoint: {tmp_path / 'nan.pt'} has non-finite weights (NaN or inf "
                   "in 2 of its tensors, e.g. features.1.running_var); give the weights of a model that trained "
                   "without diverging")


def test_a_safetensors_file_without_the_package_gets_the_install_hint(tmp_path, trained, monkeypatch):
    pytest.importorskip("safetensors")
    _safetensors(tmp_path / "model.safetensors", trained.state_dict())
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ModelError, match=r"needs the safetensors package \(pip install 'prunetune\[safetensors\]'\)$"):
        load_checkpoint(FlattenCNN(), str(tmp_path / "model.safetensors"))


# The cache: every entry carries its SHA-256; a damaged one is built again, a non-finite model never cached

def _base(cfg, data, log):
    torch.manual_seed(cfg.finetune.seed)  # as prepare() does before building the base architecture
    model = build_model("digits_cnn", data.num_classes, 1)
    path = trained_base(cfg, model, data, log=log)
    return path, model.state_dict()


def _zero_20kb(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 - 10_000)
        f.write(bytes(20_000))


def _nan_with_checksum(path):  # a NaN model cached by an older prunetune, its checksum right
    from prunetune.search.store import sha256

    state = torch.load(path, weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{sha256(path)}  {os.path.basename(path)}\n")


@pytest.mark.parametrize("damage, reason", [
    (_zero_20kb, "its SHA-256 is not the one stored with it"),
    (lambda path: os.remove(path + ".sha256"), "no checksum stored with it"),
    (_nan_with_checksum, "it holds NaN or inf weights"),
])
def test_a_damaged_cached_base_model_is_built_again_with_one_line(tmp_path, damage, reason):
    data, log = load_data("digits"), tmp_path / "log.txt"
    cfg = load_config(None, ["model.pretrain_epochs=1", f"output.cache_dir={tmp_path / 'cache'}"])
    with open(log, "w") as f:
        path, first = _base(cfg, data, f)
    from prunetune.search.store import sha256

    assert open(path + ".sha256").read() == f"{sha256(path)}  {os.path.basename(path)}\n"
    damage(path)
    with open(log, "w") as f:
        again, rebuilt = _base(cfg, data, f)
    lines = log.read_text().splitlines()
    assert again == path and lines[0] == f"base model: the cached {path} is damaged ({reason}); building it again"
    assert "training digits_cnn" in lines[1]
    assert all(torch.equal(v, rebuilt[k]) for k, v in first.items())  # the same model as before the damage
    with open(log, "w") as f:
        _base(cfg, data, f)
    assert log.read_text().startswith(f"base model: loaded {path} (cached")


def test_a_base_model_that_trains_to_nan_is_never_cached(tmp_path, monkeypatch):
    import prunetune.search.prepare as prepare_module

    def diverging(model, *args, **kwargs):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return {"test_accuracy": 0.1}

    monkeypatch.setattr(prepare_module, "finetune", diverging)
    cfg = load_config(None, ["model.pretrain_epochs=1", f"output.cache_dir={tmp_path / 'cache'}"])
    data = load_data("digits")
    with pytest.raises(ModelError, match=r"^base model: training ended with non-finite weights \(NaN or inf in 1 of "
                                         r"its tensors, e.g. features.0.weight\); nothing was cached"):
        trained_base(cfg, build_model("digits_cnn", 10, 1), data, log=open(os.devnull, "w"))
    assert not os.path.exists(base_cache_path(cfg, model_spec(cfg, 10, 1)))


@pytest.mark.slow
def test_a_damaged_sparsity_trained_cache_is_built_again_with_one_line(tmp_path, capsys):
    from prunetune.search.prepare import ensure_base
    from tests.runs import small

    cfg = load_config(None, small(tmp_path / "run", tmp_path / "cache", "model.pretrain_epochs=1",
                                  "model.sparsity=5e-3", "model.sparsity_epochs=1", "search.criterion=bn_scale"))
    first = ensure_base(prepare(cfg))
    path, trained = first.base_checkpoint, {k: v.clone() for k, v in first.model.state_dict().items()}
    _zero_20kb(path)
    capsys.readouterr()
    again = ensure_base(prepare(cfg))
    err = capsys.readouterr().err
    assert (f"sparsity training: the cached {path} is damaged (its SHA-256 is not the one stored with it); "
            "building it again\n") in err
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in trained.items())
