import dataclasses
import os
import subprocess
import sys
import typing

import pytest

from prunetune.search.config import Config, ConfigError, from_dict, load_config
from prunetune.search.prepare import base_cache_path, data_kwargs, model_spec
from prunetune.workers.settings import EvaluationSettings, FinetuneSettings
from prunetune.search.cli import main
from tests.bad_values import BAD_VALUES


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


@pytest.mark.parametrize("overrides, key, fragment", BAD_VALUES)
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


def test_a_set_value_is_text_as_typed_unless_yaml_gives_it_a_type():
    """A --set value is no YAML document: ' #' starts no comment, a date or `a: b` stays text; numbers, booleans,
    null, quoted strings and flow lists/maps keep their YAML meaning."""
    cfg = load_config(None, ["output.dir=/p/out dir #1", "model.name=a: b", "data.name=2024-01-01",
                             "search.top_k=3", "search.limits={params: 0.5}", "model.ignored_layers=[a, b]",
                             "finetune.nesterov=false", "model.checkpoint=null", "model.kwargs={note: 'x #y'}"])
    assert cfg.output.dir == "/p/out dir #1"
    assert (cfg.model.name, cfg.data.name) == ("a: b", "2024-01-01")
    assert cfg.search.top_k == 3 and cfg.search.limits == {"params": 0.5} and cfg.model.ignored_layers == ["a", "b"]
    assert cfg.finetune.nesterov is False and cfg.model.checkpoint is None and cfg.model.kwargs == {"note": "x #y"}
    assert load_config(None, ["model.name='on'"]).model.name == "on"  # quoted: a string, not YAML 1.1's true
    with pytest.raises(ConfigError, match=r"search.top_k: '3 #x' is not a valid int"):
        load_config(None, ["search.top_k=3 #x"])


def _billion_laughs(levels: int) -> str:
    """model.kwargs holding the classic alias bomb: each level a list of nine aliases of the level below."""
    lines = ["model:", "  kwargs:", "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_number_given_to_a_text_key_is_taken_as_written(tmp_path):
    assert load_config(None, ["output.dir=2024"]).output.dir == "2024"
    assert load_config(None, ["output.dir=0042", "model.name=1:20"]).output.dir == "0042"  # YAML 1.1: 34, 80
    assert load_config(None, ["model.name=1:20"]).model.name == "1:20"
    cfg = load_config(None, ["search.top_k=0x10", "search.num_candidates=1_000", "finetune.lr=1.0e-3"])
    assert (cfg.search.top_k, cfg.search.num_candidates, cfg.finetune.lr) == (16, 1000, 0.001)  # numbers as YAML
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  num_candidates: 1e3\n")
    with pytest.raises(ConfigError, match=r"search.num_candidates: '1e3' is not a valid int"):
        load_config(str(path))


def test_a_yaml_alias_bomb_is_refused_in_one_line_naming_the_key(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs(5))  # 9^6 strings once expanded (8 levels: 9^9 strings, 2.7 GB before)
    with pytest.raises(ConfigError) as e:
        load_config(str(bomb))
    message = str(e.value)
    assert message.startswith("model.kwargs.l5: ") and f"YAML aliases of {bomb}" in message
    assert "at most 100000" in message and "\n" not in message and len(message) < 300
    with pytest.raises(ConfigError, match="model.kwargs: a YAML alias in --set holds itself"):
        load_config(None, ["model.kwargs=&a [1, *a]"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  kwargs:\n    a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"^config: {deep} nests its values too deeply$"):
        load_config(str(deep))
    few = tmp_path / "anchors.yaml"  # aliases that stay small are YAML as usual
    few.write_text("model:\n  kwargs: &k {width: 8}\ndata:\n  kwargs: *k\n")
    assert load_config(str(few)).data.kwargs == {"width": 8}


def test_an_error_shows_at_most_200_characters_of_a_value(tmp_path, capsys):
    long = "[" + ", ".join(["12345"] * 20_000) + "]"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"search.num_candidates={long}"])
    assert str(e.value) == f"search.num_candidates: {repr([12345] * 20_000)[:197]}... is not a valid int"
    code = main(["run", "--set", f"output.dir={tmp_path / 'run'}", "--set", f"output.cache_dir={tmp_path / 'cache'}",
                 "--set", "model.pretrain_epochs=1", "--set", f"model.kwargs={{unknown: {long}}}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 400
    assert err.startswith("prunetune: error: model.kwargs: building digits_cnn with {'unknown': [12345, 12345, ")
    assert "12... failed (TypeError: " in err


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    cfg = load_config(None, ["model.checkpoint=~/ck.pt", "data.path=$DATA/images", "output.dir=${DATA}/runs/a",
                             "output.cache_dir=~/cache"])
    assert cfg.model.checkpoint == str(tmp_path / "home" / "ck.pt")
    assert cfg.data.path == str(tmp_path / "data" / "images")
    assert cfg.output.dir == str(tmp_path / "data" / "runs" / "a")
    assert cfg.output.cache_dir == str(tmp_path / "home" / "cache")
    assert load_config().output.cache_dir == str(tmp_path / "home" / ".cache" / "prunetune")  # the default too


def test_a_path_is_expanded_once_when_the_config_is_read_and_used_as_it_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", str(tmp_path / "a$HOME"))  # a directory whose name holds a `$`: no variable
    cfg = load_config(None, ["data.name=cifar10", "data.path=$DATA/images", "output.cache_dir=$DATA/cache"])
    kwargs = data_kwargs(cfg)
    assert kwargs["path"] == str(tmp_path / "a$HOME" / "images")
    assert kwargs["cache_dir"] == str(tmp_path / "a$HOME" / "cache")
    assert base_cache_path(cfg, model_spec(cfg, 10, 3)).startswith(str(tmp_path / "a$HOME" / "cache") + os.sep)


@pytest.mark.parametrize("section, kind, driver_only", [
    ("evaluation", EvaluationSettings, set()),
    ("finetune", FinetuneSettings, {"scheduler", "grace_epochs", "workers_per_finalist", "epoch_timeout_s"})])
def test_the_worker_settings_are_their_sections_keys_with_the_same_defaults_and_types(section, kind, driver_only):
    keys, hints = Config.model_fields[section].annotation.model_fields, typing.get_type_hints(kind)
    assert set(keys) - {f.name for f in dataclasses.fields(kind)} == driver_only  # how the driver schedules it
    for f in dataclasses.fields(kind):
        assert (keys[f.name].default, keys[f.name].annotation) == (f.default, hints[f.name]), f.name
    got = getattr(load_config(None, [f"{section}.seed=7", f"{section}.amp=off"]), section).settings()
    assert got == dataclasses.replace(kind(), seed=7, amp="off") and isinstance(got, kind)


def test_an_unset_variable_in_a_path_is_refused_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RTV", raising=False)
    code = main(["run", "--set", "output.dir=$RTV/x", "--set", f"output.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("prunetune: error: output.dir: environment variable RTV (in '$RTV/x') is not set; set it, or "
                   "write the path without it")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match=r"^model.checkpoint: no home directory is known for ~no-such-user-x"):
        load_config(None, ["model.checkpoint=~no-such-user-x/ck.pt"])


def test_a_submitted_job_leaves_paths_to_the_cluster(tmp_path, monkeypatch):
    """`submit` checks the config here but stages it as typed: ~ and $VARIABLES are the cluster's to expand."""
    import yaml

    from prunetune.search import jobs

    staged = {}

    class Cluster:
        def submit_job(self, entrypoint, runtime_env, submission_id):
            with open(os.path.join(runtime_env["working_dir"], "prunetune-job.yaml")) as f:
                staged.update(yaml.safe_load(f))
            return "job-1"

    monkeypatch.setattr(jobs, "client", lambda address: Cluster())
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    assert jobs.submit(None, "http://head:8265", ["data.path=$SCRATCH/data", "output.cache_dir=~/cache",
                                                  "output.dir=runs/a", "search.top_k=0x10"]) == "job-1"
    assert staged["data"] == {"path": "$SCRATCH/data"}
    assert staged["output"] == {"cache_dir": "~/cache", "dir": "~/prunetune-runs/a"}
    assert from_dict(staged).search.top_k == 16  # a number staged as typed is read as the cluster reads it
