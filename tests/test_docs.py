"""The documentation cannot drift from the code: its snippets run and print what the pages show, its reference pages
are generated from the code (a changed model changes the page), every page's includes exist, and no code block is
pasted from a file a page could include."""
import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from pydantic import Field

from tests.faults import ROOT

DOCS = os.path.join(ROOT, "docs")


def _gen():
    """docs/gen.py, the mkdocs hook, as a module."""
    spec = importlib.util.spec_from_file_location("docs_gen", os.path.join(DOCS, "gen.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> dict[str, str]:
    """Every hand-written page under docs/, by path."""
    return {p: open(p).read() for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)}


@pytest.mark.slow
def test_the_python_api_snippet_prints_what_its_page_shows(tmp_path):
    code = os.path.join(DOCS, "snippets", "python_api.py")
    shown = open(os.path.join(DOCS, "snippets", "python_api.out")).read()
    page = open(os.path.join(DOCS, "guides", "python-api.md")).read()
    assert '--8<-- "docs/snippets/python_api.py"' in page and '--8<-- "docs/snippets/python_api.out"' in page
    proc = subprocess.run([sys.executable, code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the accuracies depend on the CPU's vector instructions (float sums in another order train another base: here
    # AVX-512 and AVX2 kernels gave 0.680/0.647/0.860 and 0.687/0.640/0.843): the text is exact, the ranking alike
    number = r"accuracy (\d\.\d{3})"
    assert re.sub(number, "accuracy X", proc.stdout) == re.sub(number, "accuracy X", shown)
    ours, theirs = ([float(a) for a in re.findall(number, text)] for text in (proc.stdout, shown))
    assert sorted(range(3), key=ours.__getitem__) == sorted(range(3), key=theirs.__getitem__), proc.stdout


def test_every_include_names_a_file_and_section_that_exist():
    includes = [(path, m) for path, text in _pages().items()
                for m in re.findall(r'^--8<-- "([^"]+)"$', text, re.M)]
    assert len(includes) >= 5
    for path, include in includes:
        file, _, section = include.partition(":")
        text = open(os.path.join(ROOT, file)).read()
        assert not section or f"--8<-- [start:{section}]" in text, (path, include)


def test_no_page_pastes_a_code_block_it_could_include():
    sources = [open(p).read() for p in glob.glob(os.path.join(ROOT, "examples", "*.*"))
               + [os.path.join(ROOT, "tests", "toy_method.py")] + glob.glob(os.path.join(DOCS, "snippets", "*"))]
    for path, text in _pages().items():
        for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
            lines = [line for line in block.splitlines() if line.strip() and not line.startswith("--8<--")]
            if len(lines) >= 4:
                assert not any(block.strip() in source for source in sources), (path, block[:200])


def test_the_config_page_follows_the_models(monkeypatch):
    gen = _gen()
    import prunetune.search.config as config
    from prunetune.search.config import Config, SearchConfig

    page = gen.config_page(Config)
    for section, field in Config.model_fields.items():
        assert all(f"`{section}.{name}`" in page for name in field.annotation.model_fields)
    assert "| `search.front_points` | int | 5 | >= 2, <= 1000 | the budgets a target range is split into |" in page
    assert "| `search.criterion` | str | \"l1\" | one of l1, l2, bn_scale, random | how a layer's" in page  # live
    assert "| `data.path` | str \\| None | null |  | the data set's directory" in page  # a validated path type
    assert "none or auto: 10x the median time between a trial's results" in page  # the comment above a field

    class Patched(SearchConfig):
        # candidates without progress
        patience: int = Field(7, ge=2)  # before stopping

    class PatchedConfig(Config):
        search: Patched = Patched()

    assert "| `search.patience` | int | 7 | >= 2 | candidates without progress before stopping |" in \
        gen.config_page(PatchedConfig)
    monkeypatch.setattr(config, "Config", PatchedConfig)  # the site's build (the hook's pages()) reads the code now
    assert "| `search.patience` | int | 7 | >= 2 | candidates without progress before stopping |" in \
        gen.pages()["reference/config.md"]


def test_every_config_key_says_what_it_is_and_the_guide_does_not_restate_them():
    from prunetune.search.config import Config

    page = _gen().config_page(Config)
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(f.annotation.model_fields) for f in Config.model_fields.values())
    assert [row for row in rows if row.endswith("|  |")] == []  # every key has its note in search/config.py
    guide = open(os.path.join(DOCS, "guides", "configuration.md")).read()
    assert "](../reference/config.md)" in guide and not re.search(r"^\|.*\|$", guide, re.M)  # no table by hand


def test_the_cli_page_follows_the_parser():
    gen = _gen()
    from prunetune.search.cli import build_parser

    parser = build_parser()
    page = gen.cli_page(parser)
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert re.findall(r"^## `prunetune (\w+)`", page, re.M) == list(subs.choices)
    subs.choices["run"].add_argument("--dry-run-of-a-test", help="a flag only this test adds")
    assert "--dry-run-of-a-test" in gen.cli_page(parser)


def test_the_api_page_documents_every_public_name_where_it_is_defined():
    import prunetune

    page = _gen().api_page(prunetune)
    names = re.findall(r"^::: ([\w.]+)$", page, re.M)
    assert [n.rsplit(".", 1)[1] for n in names] == prunetune.__all__
    for name in names:  # each identifier is a module path in the source tree, where mkdocstrings reads it
        module = name.rsplit(".", 1)[0]
        assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py"), name


def test_each_bench_page_names_its_json_and_shows_its_figures():
    gen = _gen()
    page = gen.bench_page(os.path.join(ROOT, "bench", "results", "search_quality.json"))
    assert "Rendered from `bench/results/search_quality.json`" in page
    assert re.search(r"^\| tpe \| 0\.7 \| 0\.752 \| 32 \| 3 \|$", page, re.M), page[:3000]
    results = glob.glob(os.path.join(ROOT, "bench", "results", "*.json"))
    pages = gen.pages()
    assert {f"bench/results/{os.path.basename(p)[:-5]}.md" for p in results} <= set(pages)


def test_the_error_classes_page_lists_every_prunetune_error_with_its_exit_status():
    import prunetune.search
    import prunetune.workers
    from prunetune.workers.errors import BadInput

    class CatalogProbe(BadInput):
        """A probe this test defines."""

    page = _gen().errors_page([prunetune.search, prunetune.workers])
    assert f"| `CatalogProbe` | `{__name__}` | BadInput | 2 | A probe this test defines. |" in page
    assert re.search(r"^\| `TrainingDiverged` \| `prunetune\.workers\.finetune` \| .* \| 1 \|", page, re.M)


def test_the_refused_values_page_shows_each_tested_rows_message_as_the_code_gives_it():
    from tests.bad_values import BAD_VALUES

    page = _gen().refusals_page(BAD_VALUES)
    assert page.count("| `--set ") == len(BAD_VALUES) and "(accepted)" not in page
    assert "| `--set search.target=1.5` | `prunetune: error: search.target: 1.5 is outside the allowed range" in page
    assert "(accepted)" in _gen().refusals_page([(["search.target=0.4"], "search.target", "")])


def test_no_code_block_is_written_twice():
    texts = [*_pages().values(), open(os.path.join(ROOT, "README.md")).read()]
    blocks = [b.strip() for text in texts for b in re.findall(r"```\w*\n(.*?)```", text, re.S)]
    blocks = [b for b in blocks if len(b.splitlines()) >= 2 and not b.startswith("--8<--")]
    assert len(blocks) == len(set(blocks)), [b[:80] for b in blocks if blocks.count(b) > 1]


def test_the_bench_tables_pages_name_are_rendered_from_their_json():
    gen = _gen()
    directives = [(path, m) for path, text in _pages().items() for m in gen.BENCH_TABLE.finditer(text)]
    assert len(directives) >= 10
    for path, m in directives:  # every one names JSONs and a key they hold, and each column is saved somewhere
        names, key, columns = m.group(1).split(","), m.group(2), m.group(3)
        out = gen.bench_tables(m.group(0), "../")
        links = ", ".join(f"[`bench/results/{n}`](../bench/results/{n[:-5]}.md)" for n in names)
        assert f"(`{key}` of {links})" in out, path
        rows = [line.split(" | ") for line in out.splitlines()[2:] if line.startswith("| ")]
        for i in range(len(columns.split(",")) if columns else 0):
            assert any(row[i].strip("| ") != "(not saved)" for row in rows), (path, m.group(0), i)
    out = gen.bench_tables("<!-- bench-table: prune.json rows -->", "../")
    assert re.search(r"^\| resnet50 \| 0\.06733 \| 51\.85 \| 333\.8 \| 6\.438 \|$", out, re.M), out


def test_a_bench_table_selects_columns_formats_them_and_joins_files():
    gen = _gen()
    out = gen.bench_tables("<!-- bench-table: sweep-0.01.json,sweep-0.1.json . columns=file,args.sparsity,"
                           "sparse_test_accuracy:pct,sparse_gammas.median:f3 -->", "")
    assert out.startswith("| file | args.sparsity | sparse_test_accuracy | sparse_gammas.median |\n|---|---|---|---|\n"
                          "| sweep-0.01.json | 0.01 | 86.24% | 0.275 |\n"
                          "| sweep-0.1.json | 0.1 | (not saved) | (not saved) |\n"), out
    assert out.endswith("(`.` of [`bench/results/sweep-0.01.json`](bench/results/sweep-0.01.md), "
                        "[`bench/results/sweep-0.1.json`](bench/results/sweep-0.1.md))")


def test_the_errors_page_shows_the_bad_input_catalogs_the_tests_run():
    import tests.bad_values as catalog

    page = open(os.path.join(DOCS, "reference", "errors.md")).read()
    typed = "\n".join(line for line in page.splitlines() if not line.startswith("| a long value"))  # its own case
    catalogs = [("BAD_INPUTS", "tests/test_reliability.py"), ("BAD_DATA", "tests/test_data.py"),
                ("BAD_MODELS", "tests/test_generality.py")]
    for name, test in catalogs:
        assert page.count(f"<!-- bad-inputs: {name} {test} -->") == 1
        table = _gen().bad_inputs_table(getattr(catalog, name), name, test)
        for what, overrides, fragment in getattr(catalog, name):
            assert f"| {what} | {' '.join(f'`--set {o}`' for o in overrides)} | `{fragment}` |" in table
            assert f"`{fragment}" not in typed, fragment  # shown once, from the catalog, not typed again beside it


def test_the_run_files_page_follows_the_dataclasses():
    import dataclasses

    from prunetune.search.runfiles import RUN_FILES, Summary

    page = _gen().runfiles_page(RUN_FILES)
    assert all(f"## `{path}`" in page for path in RUN_FILES)
    assert "| `final[].int8.fp32.test_accuracy` | float |" in page  # nested records, each field with its type
    assert "| `final[].val` | float \\| None | `metric` on the validation split, the kept epoch |" in page

    @dataclasses.dataclass(kw_only=True)
    class Patched(Summary):
        budget_front: list[float]  # a field added later

    assert "| `budget_front` | list[float] | a field added later |" in _gen().runfiles_page({"s.json": Patched})


_QUICK = "tests/test_readme.py::test_ci_runs_exactly_the_readme_quick_start_commands"
_LOCAL_HEAD = "tests/test_cluster.py::test_submit_status_logs_against_a_local_head"
# Each command of a ```bash block in the README and the pages, and the test that runs it or its equivalent (a full
# run, a cluster, a machine's timings: too slow or too machine-bound to run here as written). The cheap part runs in
# test_every_prunetune_command_of_a_page_parses_and_its_config_loads.
COMMANDS = {
    'pip install -e ".[test]"': _QUICK,
    'pip install -e ".[test]" && prunetune run': _QUICK,  # CI runs the line itself
    "pytest": _QUICK,
    "prunetune inspect examples/latency.yaml --latency":
        "tests/test_latency.py::test_inspect_latency_names_each_layer_whose_kept_count_misses_the_kernels_width",
    "prunetune run examples/latency.yaml":
        "tests/test_examples.py::test_the_latency_example_times_every_candidate_under_its_budget",
    'prunetune run --set "search.target=[0.3, 0.7]" --set search.top_k=1 --set finetune.scheduler=fifo':
        "tests/test_front.py::test_a_range_yields_a_front_of_five_budgets_in_the_report",
    "prunetune export runs/default --point 2 --format onnx":
        "tests/test_front.py::test_every_point_exports_with_the_report_s_figures",
    "prunetune export runs/default --budget 0.7":
        "tests/test_front.py::test_every_point_exports_with_the_report_s_figures",
    # a cloud account's cluster: not run by a test; the prunetune commands that follow run against a local head
    "ray get-auth-token --generate": None, "ray up cluster.yaml": None, "ray dashboard cluster.yaml &": None,
    "export RAY_AUTH_MODE=token": None,
    "prunetune submit my-search.yaml --address http://127.0.0.1:8265": _LOCAL_HEAD,
    "prunetune status JOB_ID --address http://127.0.0.1:8265": _LOCAL_HEAD,
    "prunetune logs JOB_ID --address http://127.0.0.1:8265 --follow": _LOCAL_HEAD,
    "prunetune run examples/slimming.yaml":
        "tests/test_examples.py::test_the_network_slimming_example_trains_sparsity_first",
    "prunetune run examples/unstructured.yaml":
        "tests/test_examples.py::test_the_unstructured_example_claims_no_speed_up",
    "prunetune run examples/stripe.yaml":
        "tests/test_examples.py::test_the_stripe_example_trains_the_filter_skeleton_first",
}


def _bash_commands() -> list[tuple[str, str]]:
    """(file, command) for each line of each ```bash block of the README and the pages, its comment left out."""
    texts = {os.path.join(ROOT, "README.md"): open(os.path.join(ROOT, "README.md")).read(), **_pages()}
    return [(path, re.sub(r"\s+#.*$", "", line).strip()) for path, text in texts.items()
            for block in re.findall(r"```(?:bash|console|sh|shell)\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip()]


def test_every_command_of_a_page_is_run_by_a_test_that_exists():
    found = _bash_commands()
    assert len(found) >= 15
    for path, command in found:
        assert command in COMMANDS, f"{os.path.relpath(path, ROOT)}: `{command}`: no test runs it (add it to COMMANDS)"
    assert {command for _, command in found} == set(COMMANDS)  # no entry for a command the pages no longer show
    for test in filter(None, set(COMMANDS.values())):
        file, _, name = test.partition("::")
        assert f"def {name}(" in open(os.path.join(ROOT, file)).read(), test


def test_every_prunetune_command_of_a_page_parses_and_its_config_loads(monkeypatch):
    import shlex

    from prunetune.search.cli import build_parser
    from prunetune.search.config import load_config

    monkeypatch.chdir(ROOT)
    parser = build_parser()
    commands = [c.split("&&")[-1].strip() for _, c in _bash_commands() if "prunetune " in c]
    assert len(commands) >= 10
    for command in commands:
        args = parser.parse_args(shlex.split(command.rstrip("&"))[1:])  # every option exists and takes its value
        config = getattr(args, "config", None)
        if args.command in ("run", "inspect") or (config and os.path.isfile(config)):
            load_config(config if config and os.path.isfile(config) else None, args.set)  # every key and value allowed


def test_the_architecture_page_places_every_module_and_names_only_modules_that_exist():
    page = open(os.path.join(DOCS, "concepts", "architecture.md")).read()
    modules = [p for folder in ("search", "workers", os.path.join("workers", "methods"))
               for p in glob.glob(os.path.join(ROOT, folder, "*.py")) if not p.endswith("__init__.py")]
    named = set(re.findall(r"\b(\w+)\.py\b", page))
    assert [os.path.relpath(p, ROOT) for p in modules if os.path.basename(p)[:-3] not in named] == []
    folders = [os.path.join(ROOT, f) for f in ("search", "workers", os.path.join("workers", "methods"), "tests")]
    for name in named:
        assert any(os.path.isfile(os.path.join(f, f"{name}.py")) for f in folders), name


# A quoted message's placeholders (a path X, counts N and K, a MOUNT, an OUTPUT folder, `...`, a figure, nan or inf, a
# signal's name): each stands for what the code fills in.
_HOLE = re.compile(r"\.\.\.|\b(?:X|N|K|MOUNT|OUTPUT|SIG[A-Z]+|nan|inf)\b|\d+(?:\.\d+)?")


def _code_strings() -> set[str]:
    """Every str constant of search/ and workers/ but their docstrings: string literals (implicit concatenation joined
    by the parser) and the constant parts of f-strings."""
    files = glob.glob(os.path.join(ROOT, "search", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "workers", "**", "*.py"), recursive=True)
    nodes = [node for path in files for node in ast.walk(ast.parse(open(path).read()))]
    docstrings = {id(node.value) for node in nodes if isinstance(node, ast.Expr)}
    return {node.value for node in nodes
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def _by_8_gram(strings: set[str]) -> dict[str, set[str]]:
    """The strings that hold each run of 8 characters."""
    index: dict[str, set[str]] = {}
    for s in strings:
        for i in range(len(s) - 7):
            index.setdefault(s[i:i + 8], set()).add(s)
    return index


def _said_by_the_code(message: str, strings: set[str], index: dict[str, set[str]]) -> bool:
    """Whether `message` is pieced together from the code's strings: each stretch of it is a placeholder, a stretch of
    12 or more characters of one string, or a whole string of 4 or more characters, of no letters (an f-string's joint
    such as "); ") or right after a placeholder (the " s" of f"{limit} s"), so that a changed or reworded string leaves
    a stretch of the message unaccounted for."""
    corpus = "\0".join(set().union(*(index.get(message[i:i + 8], ()) for i in range(len(message) - 7))))
    reached, after_hole = [True] + [False] * len(message), [False] * (len(message) + 1)
    for i in range(len(message)):
        if not reached[i]:
            continue
        hole = _HOLE.match(message, i)
        if hole:
            reached[hole.end()] = after_hole[hole.end()] = True
        for j in range(i + 1, len(message) + 1):
            part = message[i:j]
            whole = part in strings and (len(part) >= 4 or after_hole[i] or not re.search("[A-Za-z]", part))
            if whole or (j - i >= 12 and part in corpus):
                reached[j] = True
            elif j - i >= 12:
                break  # no longer stretch of one string starts here either; whole strings that do are shorter
    return reached[-1]


def test_each_message_the_faults_guide_quotes_is_the_codes_and_its_row_names_tests_that_exist():
    strings = _code_strings()
    index = _by_8_gram(strings)
    page = open(os.path.join(DOCS, "guides", "faults.md")).read()
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in page.splitlines()
            if line.startswith("| ") and not line.startswith("| fault |")]
    assert len(rows) >= 20 and all(len(row) == 4 for row in rows)
    messages = [q for row in rows for q in re.findall(r"`([^`]+)`", row[1])
                if " " in q and not re.match(r"prunetune \w|resume\b", q)]  # not a key, a file or a command
    assert len(messages) >= 20
    for message in messages:
        assert _said_by_the_code(message, strings, index), f"faults.md quotes a message no code says: `{message}`"
        word = max(re.findall(r"[a-z]{5,}", message), key=len)
        assert not _said_by_the_code(message.replace(word, word[::-1]), strings, index), message  # the check can fail
    for fault, *_, tests in rows:
        named = re.findall(r"`(test_\w+\.py)(?:::(\w+?)(\*?))?`", tests)
        assert named, fault
        for file, name, glob_ in named:
            text = open(os.path.join(ROOT, "tests", file)).read()
            tail = r"\w*\(" if glob_ else r"\("
            assert not name or re.search(rf"^def {name}{tail}", text, re.M), (fault, file, name)
