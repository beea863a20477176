"""The README is one screen, its result line is the committed bench JSON's, its quick start is what CI runs; the
checkpoints the docs describe load."""
import os
import re

import yaml

from tests.faults import ROOT


def _quick_start() -> list[str]:
    """The commands of the README's quick-start block."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Quick start"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_the_readme_is_one_screen_and_its_result_is_the_committed_bench_json():
    import json

    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 150
    rows = json.load(open(os.path.join(ROOT, "bench", "results", "search_quality.json")))["rows"]
    tpe = next(r for r in rows if r["algorithm"] == "tpe")
    found = re.search(r"in (\d+) candidates within \*\*(\d+) candidates\*\* \(median of (\d+) seeds", readme)
    assert found, "the README's result line"
    budget, needed, seeds = map(int, found.groups())
    args = json.load(open(os.path.join(ROOT, "bench", "results", "search_quality.json")))["args"]
    assert (budget, needed, seeds) == (args["budget"], tpe["candidates_to_random_best"], len(args["seeds"].split(",")))


def test_the_readme_comparison_with_torch_pruning_is_the_committed_bench_json():
    """Per budget of bench/results/versus.json, then versus-resnet56.json and versus-resnet56-30.json, where both were
    fine-tuned: the searched model's and Torch-Pruning's global magnitude pruning's mean test accuracy, the seeds and
    fine-tuning steps behind them, and the ratio of their wall times."""
    import json

    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    found = re.findall(r"at (\d+)% of the FLOPs ([\d.]+)% vs ([\d.]+)% \((\d+) seeds? of (\d+) fine-tuning steps, "
                       r"(\d+)x the time\)", readme)
    measured = []
    for name in ("versus.json", "versus-resnet56.json", "versus-resnet56-30.json"):
        result = json.load(open(os.path.join(ROOT, "bench", "results", name)))
        for budget in result["budgets"]:
            ours = next(r for r in budget["rows"] if r["method"].startswith("prunetune search"))
            theirs = next(r for r in budget["rows"] if r["method"].startswith("TP global, GroupMagnitude"))
            if ours["test"] and theirs["test"]:
                measured.append((result["args"]["steps"], budget, ours, theirs))
    assert measured and len(found) == len(measured), "the README's comparison line: one clause per measured budget"
    for (target, mine, tps, seeds, steps, times), (bench_steps, budget, ours, theirs) in zip(found, measured):
        means = (round(100 * ours["test_mean"], 2), round(100 * theirs["test_mean"], 2))
        assert (int(target), float(mine), float(tps)) == (round(100 * budget["target"]), *means)
        assert int(seeds) == len(ours["test"]) == len(theirs["test"]) and int(steps) == bench_steps
        assert int(times) == int(ours["seconds_to_strategy"] / theirs["seconds_to_strategy"])


def test_the_readme_latency_table_is_the_committed_bench_json():
    import json

    readme = open(os.path.join(ROOT, "README.md")).read()
    for runtime, title in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO"), ("torch", "PyTorch")):
        for r in json.load(open(os.path.join(ROOT, "bench", "results", f"latency-{runtime}.json")))["results"]:
            row = (f"| {title} | {r['model']}, batch {r['batch']} | {100 * r['median_error']:.1f}% | "
                   f"{100 * r['fraction_median_error']:.1f}% | {r['flops_speedup']:.2f}x | "
                   f"{r['predicted_speedup']:.2f}x | {r['speedup']:.2f}x |")
            assert row in readme, row


def test_the_readme_config_for_your_own_cnn_is_valid():
    from prunetune.search.config import from_dict

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```yaml\n(.*?)```", readme[readme.index("## Your own CNN"):], re.S).group(1)
    cfg = from_dict(yaml.safe_load(block))  # every key exists, every value is allowed
    assert (cfg.data.name, cfg.output.dir) == ("imagefolder", "runs/mine")


def test_ci_runs_exactly_the_readme_quick_start_commands():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    # CI writes its run into runs/ci, not the user's runs/default: the only change it makes to a command
    ran = [re.sub(r" --set output\.dir=\S+", "", line) for line in ci]
    commands = _quick_start()
    assert commands == ["pip install -e \".[test]\" && prunetune run", "pytest"]
    assert all(command in ran for command in commands), (commands, ci)
    assert ran.index(commands[0]) < ran.index(commands[1])


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
        assert about["model"] in os.path.basename(path) and 0.8 < about["test_accuracy"] < 1.0  # what the docs say
        model = build_model(about["model"], 10, 3)
        load_checkpoint(model, path)  # every tensor present with its shape, read with weights_only
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


def test_the_readmes_links_into_the_docs_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 5 and all(os.path.isfile(os.path.join(ROOT, link)) for link in links), links
