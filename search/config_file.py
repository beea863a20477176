"""From YAML text to a validated config: the file (a key given twice is an error, aliases that expand past
MAX_VALUES values are refused), `--set` overrides (plain text unless YAML gives it a type; a number stays text until
its key reads it), the section base class that reads a value as YAML 1.1 and --set write it (finite numbers only),
path keys with ~ and $VARIABLES expanded, and pydantic's errors as one line that names the key."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError, core_schema

from prunetune.workers.errors import BadInput
from prunetune.workers.messages import shown

MAX_VALUES = 100_000  # values of one config file or --set value, once its YAML aliases are expanded
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")  # $NAME or ${NAME}, as os.path.expandvars reads them
# The tags of the plain --set values YAML gives a type; any other plain text is taken as typed (a date, a ' #', and a
# number: its key reads it, so that a text key keeps `2024` or `0042` as written).
_TYPED = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "null")}
_NUMBERS = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float")}
S = TypeVar("S")


class ConfigError(BadInput, ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


class Choice:
    """A str field's allowed values, read from `values` (a live registry, e.g. METHODS) whenever a value is checked;
    with `protocol`, the chosen entry must have every member the protocol declares (a registered method missing
    `unpack` is refused here, not at its first export)."""

    def __init__(self, values: Any, protocol: type | None = None):
        self.values, self.protocol = values, protocol

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: str) -> str:
        if value not in self.values:
            raise PydanticCustomError("choice", "allowed: {allowed}", {"allowed": ", ".join(self.values)})
        missing = protocol_gaps(self.values[value], self.protocol) if self.protocol is not None else []
        if missing:
            raise PydanticCustomError("protocol", "the registered '{value}' lacks {missing} ({protocol} declares them)",
                                      {"value": value, "missing": ", ".join(missing),
                                       "protocol": self.protocol.__name__})
        return value


def protocol_gaps(entry: Any, protocol: type) -> list[str]:
    """The members `protocol` declares (methods and annotated attributes) that `entry` does not have."""
    declared = {name for name in vars(protocol) if not name.startswith("_")}
    declared |= set(getattr(protocol, "__annotations__", {}))
    return sorted(name for name in declared if not hasattr(entry, name))


def expand_path(path: str) -> str:
    """`path` with a leading ~ or ~user and every $NAME / ${NAME} expanded; an unknown user or unset variable is an
    error (never a directory named after it)."""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        raise PydanticCustomError("path", "no home directory is known for {tilde} (in {path}); write the directory out",
                                  {"path": shown(path), "tilde": expanded.split(os.sep)[0]})

    def value(match: re.Match) -> str:
        name = match.group(1).strip("{}")
        if name not in os.environ:
            raise PydanticCustomError("path", "environment variable {name} (in {path}) is not set; set it, or write "
                                      "the path without it", {"path": shown(path), "name": name})
        return os.environ[name]

    return _VARIABLE.sub(value, expanded)


# A path key: ~ and environment variables expanded when the config is read (a default too, with validate_default; the
# run's config.yaml keeps the path that was used).
ExpandedPath = Annotated[str, AfterValidator(expand_path)]


class Section(BaseModel):
    """A config section: unknown keys refused, strict types (an int is not 1.5 or true; a float may be 2, never inf
    or nan), checked on assignment too."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_yaml_means_it(cls, value: Any, info) -> Any:
        field = cls.model_fields[info.field_name]
        types = get_args(field.annotation) or (field.annotation,)
        if type(None) in types and isinstance(value, str) and value.strip().lower() == "none":
            return None  # --set key=none clears an optional key (YAML's own null is `null` or `~`)
        if isinstance(value, bool) and any("off" in getattr(m, "values", ()) for m in field.metadata):
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, str) and (int in types or float in types):  # a number given as text (--set)
            number = _number(value)
            if number is not None and (float in types or isinstance(number, int)):
                return number
        return value

    def as_settings(self, kind: type[S]) -> S:
        """This section's values of the fields of `kind`, a frozen dataclass of the trial side (workers/settings.py)."""
        return kind(**{f.name: getattr(self, f.name) for f in dataclasses.fields(kind)})


def _number(text: str) -> int | float | None:
    """The number YAML 1.1 reads in `text` (2024, 0x1F, .inf), else Python's float of it (5e-4, 1.0e3: YAML 1.1
    leaves them text), else None."""
    loader = yaml.SafeLoader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text.strip(), (True, False))
        if tag in _NUMBERS:
            return loader.construct_object(yaml.ScalarNode(tag, text.strip()))
    finally:
        loader.dispose()
    with contextlib.suppress(ValueError):
        return float(text)
    return None


def _allowed_range(field) -> str:
    """A number field's bounds as an interval, e.g. (0, 1] or [1, 1000000] ([0, inf) when unbounded above)."""
    bounds = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    lo, hi = bounds.get("gt", bounds.get("ge", "-inf")), bounds.get("lt", bounds.get("le", "inf"))
    return f"{'(' if 'ge' not in bounds else '['}{lo}, {hi}{']' if 'le' in bounds else ')'}"


def _one_line(error: dict, root: type[BaseModel], renamed: dict[str, str]) -> str:
    """One pydantic error of `root` (a model of Sections) as a line naming the key, the value and what is allowed."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    if len(loc) == 1 and kind in ("extra_forbidden", "invalid_key"):
        return f"{loc[0]}: unknown section; allowed: {', '.join(root.model_fields)}"
    if len(loc) == 1:
        return f"{loc[0]}: must be a mapping of keys, got {shown(value)}"
    key, fields = f"{loc[0]}.{loc[1]}", root.model_fields[loc[0]].annotation.model_fields
    if kind in ("extra_forbidden", "invalid_key"):
        return f"{key}: renamed to {renamed[key]}" if key in renamed else \
            f"{key}: unknown key; allowed: {', '.join(fields)}"
    if kind == "choice":
        return f"{key}: {shown(value)} is not allowed; {error['msg']}"
    if kind in ("path", "protocol", "target"):
        return f"{key}: {error['msg']}"
    field = fields[loc[1]]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):  # the field's own bounds
        return f"{key}: {shown(value)} is outside the allowed range {_allowed_range(field)}"
    if kind == "finite_number":
        return f"{key}: {shown(value)} is not a finite number; allowed: {_allowed_range(field)}"
    expected = next(t for t in get_args(field.annotation) or (field.annotation,) if t is not type(None)).__name__
    return f"{key}: null is not allowed; expected {expected}" if value is None else \
        f"{key}: {shown(value)} is not a valid {expected}"


def validate(root: type[BaseModel], raw: Any, renamed: dict[str, str]) -> BaseModel:
    """`raw` (a dict of sections) as a `root` model; ConfigError names the first mistake as written: an unknown
    section, else the sections in their order and each one's keys in the order given."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections")
    # `section:` alone is an empty section; a section not given is built here too (its defaults read now: ~, $HOME)
    raw = {**dict.fromkeys(root.model_fields, {}), **{section: values or {} for section, values in raw.items()}}
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        sections = list(root.model_fields)

        def where(loc: tuple) -> tuple:
            if loc[0] not in sections:
                return -1, 0
            if len(loc) == 1:
                return sections.index(loc[0]), -1
            keys = [*raw[loc[0]]]  # a default's error (an expanded path) comes after the keys given
            return sections.index(loc[0]), keys.index(loc[1]) if loc[1] in keys else len(keys)

        error = min(e.errors(), key=lambda error: where(error["loc"]))
        if len(error["loc"]) == 2 and isinstance(error["input"], (int, float)) and not isinstance(error["input"], bool):
            written = raw[error["loc"][0]][error["loc"][1]]  # a number as written: 5e-4, 0x10 (given as text)
            error["input"] = _AsWritten(written) if isinstance(written, str) else written
        raise ConfigError(_one_line(error, root, renamed)) from None


class _AsWritten(str):
    """A number's text as the user wrote it: an error shows it without quotes, as a number."""

    def __repr__(self) -> str:
        return str(self)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` into the dotted key and its value: a boolean, null, quoted string or flow list/map
    as YAML reads it; any other text exactly as typed (a ' #' is no comment there, a date no date, and a number is
    read by its key: a number key as YAML reads it, a text key as typed)."""
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set {text}: expected section.key=value (e.g. search.target=0.4)")
    key, value = key.strip(), value.strip()
    if not value:
        return key, None
    loader = _ConfigLoader(value, source="--set", trail=key.split("."))
    try:
        node = loader.get_single_node()
        return key, loader.construct_document(node) if _typed(node, value) else value
    except (yaml.YAMLError, RecursionError):  # not YAML, or nested past Python's stack: text
        return key, value
    finally:
        loader.dispose()


def _typed(node: yaml.Node | None, text: str) -> bool:
    """True if YAML gives the --set value `text` (composed as `node`) a meaning of its own: all of it is one boolean,
    null, quoted string or flow list/map (not a plain string or number, a comment, a date or a block of YAML)."""
    if node is None or node.start_mark.index != 0 or node.end_mark.index != len(text):
        return False
    if isinstance(node, yaml.CollectionNode):
        return bool(node.flow_style)
    return node.style in ("'", '"') or (node.style is None and node.tag in _TYPED)


def _expanded_sizes(root: yaml.Node, source: str, trail: list[str]) -> dict[int, int]:
    """The number of values under each node of `root` (by id) once its aliases are expanded; ConfigError naming the
    key if an alias holds itself."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()

    def size(node: yaml.Node, keys: list[str]) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in inside:
            raise ConfigError(f"{'.'.join(keys) or 'config'}: a YAML alias in {source} holds itself; a config holds "
                              "no recursive values")
        inside.add(id(node))
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, keys) + size(v, [*keys, _key_text(k)]) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item, keys) for item in node.value)
        else:
            total = 1
        inside.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, trail)
    return sizes


def _key_text(node: yaml.Node) -> str:
    """A mapping key as an error names it (a scalar as written, anything else as '?')."""
    if not isinstance(node, yaml.ScalarNode):
        return "?"
    return node.value if len(node.value) <= 60 else node.value[:57] + "..."


def _check_size(root: yaml.Node, source: str, trail: list[str]) -> None:
    """ConfigError naming the key, if `root`'s aliases expand it past MAX_VALUES values (or into itself)."""
    sizes = _expanded_sizes(root, source, trail)
    if sizes[id(root)] <= MAX_VALUES:
        return
    node, keys = root, list(trail)
    while isinstance(node, yaml.MappingNode):  # down to the key that holds the most
        key, value = max(node.value, key=lambda pair: sizes[id(pair[1])])
        if sizes[id(value)] <= MAX_VALUES:
            break
        node, keys = value, [*keys, _key_text(key)]
    raise ConfigError(f"{'.'.join(keys) or 'config'}: {sizes[id(node)]} values once the YAML aliases of {source} are "
                      f"expanded; a config holds at most {MAX_VALUES}")


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override, and a
    document whose aliases expand past MAX_VALUES values (a "billion laughs") is refused before it is built."""

    def __init__(self, stream, source: str, trail: list[str] | None = None):
        super().__init__(stream)
        self.source, self.trail = source, trail or []

    def construct_document(self, node):
        _check_size(node, self.source, self.trail)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicate = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if duplicate is not None:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{duplicate}'", node.start_mark)
        return super().construct_mapping(node, deep)


def read_config(path: str | None = None, overrides: list[str] | dict | None = None) -> dict:
    """The YAML file's sections (none: no sections) with `section.key=value` overrides applied, not yet validated."""
    raw: dict = {}
    if path:
        if os.path.isdir(path):
            raise ConfigError(f"config: {path} is a directory, not a YAML file")
        if not os.path.isfile(path):
            raise ConfigError(f"config: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                loader = _ConfigLoader(f, source=path)
                try:
                    raw = loader.get_single_data() or {}
                finally:
                    loader.dispose()
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
        except RecursionError:
            raise ConfigError(f"config: {path} nests its values too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        section, name = key.split(".", 1)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: must be a mapping of keys")
        raw[section][name] = value
    return raw

