"""The walls between the code's rooms, read from the source: every import, also those inside functions.

workers/ (what runs in a trial) never imports the driver (search/) nor Ray; the strategy side of the driver
(algorithms, sampler, baselines) never reaches Ray through anything it imports; registries refuse entries that lack
what their protocol declares.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import prunetune
from prunetune.search.algorithms import ALGORITHMS
from prunetune.search.config import ConfigError, load_config
from prunetune.workers.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"prunetune": "prunetune", "prunetune.search": "search", "prunetune.workers": "workers"}


def modules(root: str = ROOT) -> dict[str, str]:
    """Every module of the installed packages: dotted name -> file."""
    found = {}
    for package, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            rel = os.path.relpath(dirpath, os.path.join(root, folder))
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            for name in files:
                if name.endswith(".py"):
                    found[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(dirpath, name)
    return found


def imports(name: str, path: str) -> set[str]:
    """The modules `path` (module `name`) imports anywhere in its body, relative imports resolved."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import channel` is a module
    return found


def graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module -> the modules it imports (ours by their dotted name, others by theirs)."""
    return {name: imports(name, path) for name, path in modules(root).items()}


def reached(start: str, edges: dict[str, set[str]]) -> set[str]:
    """Every module `start` imports, directly or through our own modules."""
    seen, todo = set(), [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def breaches(edges: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a wall, as 'importer -> imported'."""
    found = []
    for name, targets in sorted(edges.items()):
        if name.startswith("prunetune.workers"):
            found += [f"{name} -> {t}" for t in sorted(targets)
                      if t == "ray" or t.startswith(("ray.", "prunetune.search"))]
    for name in ("prunetune.search.algorithms", "prunetune.search.sampler", "prunetune.search.baselines"):
        found += [f"{name} -> {t}" for t in sorted(reached(name, edges)) if t == "ray" or t.startswith("ray.")]
    return found


def test_no_import_crosses_a_wall():
    edges = graph()
    assert {"prunetune.workers.evaluator", "prunetune.search.sampler", "prunetune.workers.methods.channel"} \
        <= set(edges)
    assert breaches(edges) == []


def test_a_crossing_import_is_found_also_inside_a_function_and_through_a_module(tmp_path):
    for folder in PACKAGES.values():
        os.makedirs(tmp_path / folder)
    (tmp_path / "workers" / "evaluator.py").write_text("def f():\n    from ..search import stages\n")
    (tmp_path / "workers" / "helper.py").write_text("import ray.tune\n")
    (tmp_path / "search" / "sampler.py").write_text("from prunetune.workers import helper\n")
    assert breaches(graph(str(tmp_path))) == [
        "prunetune.workers.evaluator -> prunetune.search", "prunetune.workers.evaluator -> prunetune.search.stages",
        "prunetune.workers.helper -> ray.tune", "prunetune.search.sampler -> ray.tune"]


class _Guesser:
    """An algorithm that proposes but never observes: not a SearchAlgorithm."""

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
        return []


def test_a_registered_entry_missing_a_protocol_member_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "guesser", _Guesser)
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=["search.algorithm=guesser"])
    assert str(refused.value) == \
        "search.algorithm: the registered 'guesser' lacks observe (SearchAlgorithm declares them)"
    monkeypatch.setitem(METHODS, "half", type("Half", (), {"name": "half", "title": "half"})())
    with pytest.raises(ConfigError, match=r"^search.granularity: the registered 'half' lacks comparable, criteria, "):
        load_config(overrides=["search.granularity=half"])
    assert load_config(overrides=["search.granularity=stripe"]).search.granularity == "stripe"


SNIPPET = os.path.join(ROOT, "docs", "snippets", "python_api.py")
DRIVER_CONFIG = ("load_config", "Config")  # prunetune's names from the driver's config (prunetune.search.config)


def test_the_python_api_example_needs_no_driver_config():
    imported = imports("snippet", SNIPPET)
    assert {"prunetune.finetune", "prunetune.EvaluationSettings", "prunetune.FinetuneSettings"} <= imported
    assert not [m for m in imported if m.startswith("prunetune.search")
                or m in {f"prunetune.{name}" for name in DRIVER_CONFIG}]
    # run: the example's imports and every other public name of prunetune load no module of the driver's config
    worker_api = [name for name in prunetune.__all__ if name not in DRIVER_CONFIG]
    code = (f"import ast, sys\ntree = ast.parse(open({SNIPPET!r}).read())\n"
            "exec(compile(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []), "
            f"'snippet', 'exec'))\nfrom prunetune import {', '.join(worker_api)}\n"
            "loaded = lambda: sorted(m for m in sys.modules if m.startswith('prunetune.search.config'))\n"
            "print(loaded())\nfrom prunetune import load_config\nprint(loaded())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "['prunetune.search.config', 'prunetune.search.config_file']"]
