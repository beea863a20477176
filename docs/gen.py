"""The documentation's generated pages, built from the code and the committed bench results at `mkdocs build` time
(a hook in mkdocs.yml): the CLI from the argument parser, the config from the pydantic models, the run files from
their dataclasses, the Python API from `prunetune.__all__`, one page per `bench/results/*.json`. Nothing here is
written into the source tree."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import inspect
import json
import os
import re
import typing
from typing import Any, Callable

from pydantic import BaseModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ROWS = 200  # rows of one bench table shown on its page (the JSON holds them all)
MAX_CELL = 300  # characters of one table cell (a refusal message fits)
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))  # pydantic's annotated_types bounds


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comments written above it and beside it in the source of the class (or of the classes it
    extends), joined."""
    found = {}
    own = [k for k in cls.__mro__ if k.__module__ not in ("pydantic.main", "builtins") and k is not BaseModel]
    for klass in reversed(own):
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            comment = re.match(r"\s+#\s*(.*)$", line)
            field = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if comment:
                above.append(comment.group(1).strip())
            elif field:
                found[field.group(1)] = " ".join([*above, (field.group(2) or "").strip()]).strip()
                above = []
            else:
                above = []
    return {name: note for name, note in found.items() if note}


def _type_name(annotation: object) -> str:
    """A field's type as a reader writes it: `int`, `float | None`, `list` (validators left out)."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = re.sub(r"\btyping\.|\bpydantic\.\w+\.|\bNoneType\b", lambda m: "None" if "None" in m[0] else "",
                  str(annotation))
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    return re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)


def _cell(value: object) -> str:
    """A value as one Markdown table cell: compact JSON, shortened, pipes escaped."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if isinstance(value, float):
        text = f"{value:.4g}"
    text = text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _is_choice(marker: object) -> bool:
    """True for a Choice marker of a field (search/config_file.py): its allowed values, read live from a registry."""
    return type(marker).__name__ == "Choice" and hasattr(marker, "values")


def config_page(config_cls: type[BaseModel]) -> str:
    """The config reference: every section's keys with type, default and the note beside the field."""
    out = ["# Configuration reference\n",
           f"Generated from the pydantic models in `{inspect.getmodule(config_cls).__name__}` at build time. Every key "
           "can be set in the YAML file or with `--set section.key=value`.\n"]
    for section, field in config_cls.model_fields.items():
        cls = field.annotation
        notes = _comments(cls)
        out.append(f"## `{section}`\n")
        rows = []
        for name, f in cls.model_fields.items():
            kind = _type_name(f.annotation)
            limits = ", ".join([f"{op} {getattr(m, attr)}" for m in f.metadata for attr, op in _BOUNDS
                                if getattr(m, attr, None) is not None]
                               + [f"one of {', '.join(m.values)}" for m in f.metadata if _is_choice(m)])
            rows.append([f"`{section}.{name}`", kind, json.dumps(f.get_default(call_default_factory=True),
                                                                  default=str), limits,
                         f.description or notes.get(name, "")])
        out.append(_table(["key", "type", "default", "limits", "what it is"], rows))
    return "\n".join(out)


def _dataclass_rows(cls: type, prefix: str, seen: set) -> list[tuple[str, list[list[object]]]]:
    """A dataclass's fields as table rows (name, type, what it is), then those of the dataclasses it holds."""
    hints, notes = typing.get_type_hints(cls), _comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        rows.append([f"`{prefix}{f.name}`", re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", _type_name(hint)),
                     notes.get(f.name, "")])
        for inner in [hint, *typing.get_args(hint)]:
            if dataclasses.is_dataclass(inner) and inner not in seen:
                seen.add(inner)
                key = f"{prefix}{f.name}{'[]' if typing.get_origin(hint) is list else ''}."
                nested += _dataclass_rows(inner, key, seen)
    return [(f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}", rows), *nested]


def runfiles_page(files: dict[str, type]) -> str:
    """The run files reference: each file's fields, with type and the note beside the field, nested records after."""
    from prunetune.search import runfiles

    out = ["# Run files\n", f"Generated from the dataclasses in `search/runfiles.py` at build time. "
           f"{runfiles.__doc__.split(chr(10) + chr(10))[1].strip()} This prunetune writes schema_version "
           f"{runfiles.SCHEMA_VERSION}.\n"]
    for path, cls in files.items():
        out.append(f"## `{path}`\n")
        for title, rows in _dataclass_rows(cls, "", {cls}):
            out += [f"{title}\n", _table(["field", "type", "what it is"], rows)]
    return "\n".join(out)


def cli_page(parser: argparse.ArgumentParser) -> str:
    """The CLI reference: the help of the command and of each subcommand, as argparse prints it."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps at the terminal's width: one width for every build
    try:
        out = ["# Command line reference\n", "Generated from `build_parser()` in `search/cli.py` at build time.\n",
               f"```text\n{parser.format_help()}```\n"]
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sp in subs.choices.items():
            out.append(f"## `prunetune {name}`\n\n```text\n{sp.format_help()}```\n")
    finally:
        if before is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(out)


def _source_path(module: str) -> str:
    """The dotted path of an installed module in the source tree: prunetune.search and prunetune.workers are the
    top-level folders search/ and workers/ (pyproject's package-dir), which is where mkdocstrings reads them."""
    return re.sub(r"^prunetune\.(search|workers)\b", r"\1", module)


def api_page(package: object) -> str:
    """The Python API reference: mkdocstrings renders the signature and docstring of each name in __all__."""
    out = ["# Python API reference\n", f"Generated from `{package.__name__}.__all__`; see the *Python API* guide "
           "for a worked example.\n"]
    for name in package.__all__:
        obj = getattr(package, name)
        module = getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None
        module = module or _defining_module(package, name)
        out.append(f"::: {_source_path(module)}.{name}\n")
    return "\n".join(out)


def _defining_module(package: object, name: str) -> str:
    """The module the package's source imports `name` from (for values, which carry no __module__)."""
    return re.search(rf"^from ([\w.]+) import .*\b{name}\b", inspect.getsource(package), re.M).group(1)


def _family(cls: type) -> list[type]:
    """cls and its subclasses, depth first, each once."""
    out = [cls]
    for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
        out += [c for c in _family(sub) if c not in out]
    return out


def errors_page(packages: list[object]) -> str:
    """The error classes: every PrunetuneError defined in the packages, with its exit status and docstring."""
    import importlib
    import pkgutil

    from prunetune.workers.errors import PrunetuneError

    for package in packages:  # every module imported, so that every subclass is known
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    rows = [[f"`{c.__name__}`", f"`{c.__module__}`", ", ".join(b.__name__ for b in c.__bases__), c.exit_code,
             (c.__doc__ or "").strip().split("\n")[0]] for c in _family(PrunetuneError)]
    return "\n".join(["# Error classes\n", "Generated from the subclasses of `PrunetuneError` "
                      "(`workers/errors.py`) at build time. The command line prints the message after "
                      "`prunetune: error: ` and exits with the class's status; the [bad input](errors.md) page "
                      "lists the messages.\n", _table(["class", "module", "bases", "exit", "what it means"], rows)])


def refusals_page(rows: list[tuple[list[str], str, str]]) -> str:
    """The config values refused: each row's overrides and the message load_config gives for them, as it is now."""
    from prunetune.search.config import ConfigError, load_config

    table = []
    for overrides, _key, _fragment in rows:
        try:
            load_config(None, overrides)
            message = "(accepted)"
        except ConfigError as e:
            message = str(e)
        table.append([" ".join(f"`--set {o}`" for o in overrides), f"`prunetune: error: {message}`"])
    return "\n".join(["# Config values refused\n", "Each row is a case of `tests/bad_values.py`, which "
                      "`tests/test_config.py` checks; the message is the one `load_config` gives now, generated at "
                      "build time. Exit status 2, nothing written. More bad input: [bad input](errors.md).\n",
                      _table(["overrides", "what you see"], table)])


def _catalog(name: str) -> list:
    """A table of bad input the tests check, from the catalog tests/bad_values.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_values", os.path.join(ROOT, "tests", "bad_values.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


BAD_INPUTS = re.compile(r"^<!-- bad-inputs: (\w+) ([\w/.]+) -->$", re.M)  # a catalog's table and its test, in a page


def bad_inputs_table(rows: list[tuple[str, list[str], str]], name: str, test: str) -> str:
    """A catalog's bad input: what it is, its overrides and the fragment its test finds in the one-line error."""
    table = [[what, " ".join(f"`--set {o}`" for o in overrides), f"`{fragment}`"] for what, overrides, fragment in rows]
    return (_table(["bad input", "overrides", "the one line holds"], table)
            + f"\n(`{name}` of `tests/bad_values.py`, each row a case of `{test}`)")


def _render(value: object, depth: int) -> list[str]:
    """A JSON value as Markdown: tables for records and flat maps, sections for nested maps."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        header = list(dict.fromkeys(k for v in value for k in v))
        shown = [[v.get(k, "") for k in header] for v in value[:MAX_ROWS]]
        more = [f"({len(value) - MAX_ROWS} more rows in the JSON)\n"] if len(value) > MAX_ROWS else []
        return [_table(header, shown)] + more
    if isinstance(value, dict):
        flat = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
        out = [_table(["key", "value"], [[k, v] for k, v in flat.items()])] if flat else []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and depth < 4:
                out += [f"{'#' * (depth + 2)} {k}\n"] + _render(v, depth + 1)
            elif isinstance(v, (dict, list)):
                out.append(f"`{k}`: {_cell(v)}\n")
        return out
    return [f"`{_cell(value)}`\n"]


def bench_page(path: str) -> str:
    """One bench result's page: its JSON file rendered as tables, naming the file."""
    name = os.path.relpath(path, ROOT)
    data = json.load(open(path))
    return "\n".join([f"# {os.path.basename(path)[:-5]}\n", f"Rendered from `{name}` at build time.\n"]
                     + _render(data, 0))


# a JSON's table in a page: `<!-- bench-table: A.json[,B.json] KEY [columns=PATH[:FORMAT],...] -->`; KEY and PATH are
# dotted paths (`.` the whole file), `file` the JSON a row comes from
BENCH_TABLE = re.compile(r"^<!-- bench-table: ([\w.,-]+\.json) ([\w.-]+)(?: columns=(\S+))? -->$", re.M)
FORMATS: dict[str, Callable[[Any], str]] = {  # how a column's values are shown: the one place formats are declared
    "pct": lambda v: f"{v:.2%}", "f1": lambda v: f"{v:.1f}", "f2": lambda v: f"{v:.2f}", "f3": lambda v: f"{v:.3f}",
    "int": lambda v: f"{v:,.0f}", "x": lambda v: f"{v:.2f}x", "ci": lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]",
    "e": lambda v: f"{v:.1e}",
}


def _lookup(value: Any, path: str) -> Any:
    """The value at a dotted path (`.` the value itself); None where the JSON holds nothing there."""
    for part in [] if path == "." else path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value


def _records(names: list[str], key: str) -> list[tuple[str, Any]]:
    """(file, record) for each record at KEY of each JSON: the rows of a list, or the value itself."""
    out = []
    for name in names:
        value = _lookup(json.load(open(os.path.join(ROOT, "bench", "results", name))), key)
        out += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    return out


def _column(file: str, record: Any, spec: str) -> object:
    """One cell of a selected column: `file`, or the record's value at PATH shown in FORMAT; empty if not saved."""
    path, _, fmt = spec.partition(":")
    value = file if path == "file" else _lookup(record, path)
    return "(not saved)" if value is None else FORMATS[fmt](value) if fmt else value


def bench_tables(markdown: str, prefix: str) -> str:
    """Each bench-table line replaced by the table of its JSONs' KEY, naming each JSON's page;
    `prefix` is the path from the page to the site's root."""
    def table(m: re.Match) -> str:
        names, key, columns = m.group(1).split(","), m.group(2), m.group(3)
        if columns:
            specs = columns.split(",")
            rows = [[_column(f, r, spec) for spec in specs] for f, r in _records(names, key)]
            body = _table([spec.partition(":")[0] for spec in specs], rows)
        else:
            body = "".join(_render(_lookup(json.load(open(os.path.join(ROOT, "bench", "results", names[0]))), key), 0))
        links = ", ".join(f"[`bench/results/{n}`]({prefix}bench/results/{n[:-5]}.md)" for n in names)
        return body + f"\n(`{key}` of {links})"
    return BENCH_TABLE.sub(table, markdown)


def pages() -> dict[str, str]:
    """Every generated page, by its path under docs/."""
    import prunetune
    import prunetune.search
    import prunetune.workers
    from prunetune.search.cli import build_parser
    from prunetune.search.config import Config
    from prunetune.search.runfiles import RUN_FILES

    out = {"reference/config.md": config_page(Config), "reference/cli.md": cli_page(build_parser()),
           "reference/run-files.md": runfiles_page(RUN_FILES),
           "reference/api.md": api_page(prunetune),
           "reference/error-classes.md": errors_page([prunetune.search, prunetune.workers]),
           "reference/refused-values.md": refusals_page(_catalog("BAD_VALUES"))}
    results = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))
    out |= {f"bench/results/{os.path.basename(p)[:-5]}.md": bench_page(p) for p in results}
    index = ["# Bench results\n", "One page per committed `bench/results/*.json`, rendered from it at build time.\n"]
    index += [f"- [{os.path.basename(p)[:-5]}]({os.path.basename(p)[:-5]}.md)" for p in results]
    out["bench/results/index.md"] = "\n".join(index) + "\n"
    return out


def on_files(files, config):
    """mkdocs hook: add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    for png in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.png"))):  # the figures bench pages show
        files.append(File.generated(config, f"bench/results/{os.path.basename(png)}", abs_src_path=png))
    return files


def on_page_markdown(markdown, page, config, files):
    """mkdocs hook: the bench tables and the bad-input catalog a hand-written page names, rendered at build time."""
    markdown = BAD_INPUTS.sub(lambda m: bad_inputs_table(_catalog(m[1]), m[1], m[2]), markdown)
    return bench_tables(markdown, "../" * page.file.src_uri.count("/"))
