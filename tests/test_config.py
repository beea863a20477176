import subprocess
import sys

import pytest

from prunetune.search.config import ConfigError, load_config
from prunetune.search.cli import main


def test_default_config_is_the_digits_search():
    cfg = load_config()
    assert cfg.model.name == "digits_cnn" and cfg.data.name == "digits"
    assert cfg.search.target == 0.5 and cfg.search.constraint == "flops" and cfg.search.algorithm == "tpe"


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  target: 0.6\nmodel:\n  name: resnet20\n")
    cfg = load_config(str(path), ["search.target=0.4", "finetune.nesterov=false", "search.time_budget_s=60",
                                  "finetune.weight_decay=5e-4"])
    assert cfg.finetune.weight_decay == 0.0005
    assert cfg.search.target == 0.4 and cfg.model.name == "resnet20"
    assert cfg.finetune.nesterov is False and cfg.search.time_budget_s == 60.0
    switches = load_config(None, ["evaluation.amp=off", "evaluation.channels_last=on"]).evaluation
    assert (switches.amp, switches.channels_last) == ("off", "on")  # YAML 1.1 reads on/off as booleans
    assert load_config(None, ["search.time_budget_s=60", "search.time_budget_s=none"]).search.time_budget_s is None


@pytest.mark.parametrize("overrides, key, fragment", [
    (["search.target=1.5"], "search.target", "outside the allowed range"),
    (["search.flops_target=0.4"], "search.flops_target", "renamed to search.target"),
    (["search.constraint=memory"], "search.constraint", "allowed: flops, params, latency"),
    (["search.algorithm=magic"], "search.algorithm", "allowed: random"),
    (["search.tolerance=0"], "search.tolerance", "outside the allowed range"),
    (["search.max_ratio=1"], "search.max_ratio", "outside the allowed range"),
    (["search.criterion=l3"], "search.criterion", "allowed: l1, l2, bn_scale, random"),
    (["search.num_candidates=many"], "search.num_candidates", "not a valid int"),
    (["search.colour=blue"], "search.colour", "unknown key"),
    (["evaluation.bn_mode=magic"], "evaluation.bn_mode", "allowed: cumulative, ema, none"),
    (["search.tolerance=0.6"], "search.tolerance", "below search.target"),
    (["data.name=cifar10"], "data.path", "needs a path"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(key) and fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config: file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("serach:\n  flops_target: 0.5\n")
    with pytest.raises(ConfigError, match="serach: unknown section"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["target=0.3"])


@pytest.mark.parametrize("overrides, fragment", [
    (["search.target=2"], "search.target: 2 is outside"),
    (["model.name=resnet99"], "model.name: unknown model 'resnet99'"),
    (["model.name=nosuchpkg.mod:fn"], "model.name: cannot import module 'nosuchpkg.mod'"),
    (["data.name=imagenet"], "data.name: unknown data set 'imagenet'"),
    (["search.target=0.05", "search.tolerance=0.01"], "reachable flops range is ["),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, overrides, fragment):
    out = tmp_path / "run"
    code = main(["run", "--set", f"output.dir={out}", "--set", f"output.cache_dir={tmp_path / 'cache'}",
                 *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_entry_point_reports_errors_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prunetune", "run", "--set", "search.max_ratio=1.2",
                           "--set", f"output.dir={tmp_path / 'x'}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "prunetune: error: search.max_ratio: 1.2 is outside the allowed range (0, 1)"


def _changed(section: str, key: str):
    """The default config with section.key set to another value its type, range and choices allow."""
    cfg = load_config()
    value, field = cfg.to_dict()[section][key], type(getattr(cfg, section)).model_fields[key]
    choices = [v for m in field.metadata for v in getattr(m, "values", ())]  # a choice field's live registry
    if isinstance(value, bool):
        options = [not value]
    elif isinstance(value, (int, float)):
        options = [value + 1, value / 2 or 0.5]
    else:
        options = [*choices, 8, 0.5, "changed", {"changed": 1}, ["changed"]]
    for option in options:
        try:
            setattr(getattr(cfg, section), key, option)
        except ValueError:
            continue
        if getattr(getattr(cfg, section), key) != value:
            return cfg
    raise AssertionError(f"no other value found for {section}.{key}")


def test_a_resume_may_change_exactly_the_keys_the_config_hash_leaves_out(tmp_path, monkeypatch, capsys):
    """One rule (config.RESUMABLE) decides both: `resume --set` refuses a key iff changing it changes the run's
    config hash; output.* is refused but not hashed (where a run lives, not what it computes)."""
    from prunetune.search import cli
    from prunetune.search.config import RESUMABLE
    from prunetune.search.rundir import RunDir, config_hash

    def loaded(*args):  # stands in for loading the run's config: the resume got past the --set check
        raise ConfigError("the resume goes on")

    run = RunDir(str(tmp_path / "run"))
    run.create(load_config(), overwrite=False)
    monkeypatch.setattr(cli, "_config", loaded)
    base = config_hash(load_config())
    for section, keys in load_config().to_dict().items():
        for key in keys:
            assert main(["resume", run.path, "--set", f"{section}.{key}=1"]) == 2
            err = capsys.readouterr().err.strip()
            refused = "a resumed run keeps its config" in err
            assert refused != ("the resume goes on" in err), err
            hashed = config_hash(_changed(section, key)) != base
            assert refused == (hashed or section == "output"), f"{section}.{key}: refused {refused}, hashed {hashed}"
            if refused:
                assert err.endswith(f"only {', '.join(k if '.' in k else k + '.*' for k in RESUMABLE)} may change")
