"""From YAML text to a validated config: the file (a key given twice is an error), `--set` overrides, the section base
class that reads a value as YAML 1.1 and --set write it, and pydantic's errors as one line that names the key."""
from __future__ import annotations

import contextlib
import os
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError, core_schema


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


class Choice:
    """A str field's allowed values, read from `values` (a live registry, e.g. METHODS) whenever a value is checked."""

    def __init__(self, values: Any):
        self.values = values

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: str) -> str:
        if value not in self.values:
            raise PydanticCustomError("choice", "allowed: {allowed}", {"allowed": ", ".join(self.values)})
        return value


class Section(BaseModel):
    """A config section: unknown keys refused, strict types (an int is not 1.5 or true; a float may be 2), checked on
    assignment too."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _as_yaml_means_it(cls, value: Any, info) -> Any:
        field = cls.model_fields[info.field_name]
        types = get_args(field.annotation) or (field.annotation,)
        if type(None) in types and isinstance(value, str) and value.strip().lower() == "none":
            return None  # --set key=none clears an optional key (YAML's own null is `null` or `~`)
        if isinstance(value, bool) and any("off" in getattr(m, "values", ()) for m in field.metadata):
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if float in types and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        return value


def _one_line(error: dict, root: type[BaseModel], renamed: dict[str, str]) -> str:
    """One pydantic error of `root` (a model of Sections) as a line naming the key, the value and what is allowed."""
    loc, kind, shown = error["loc"], error["type"], error["input"]
    if len(loc) == 1 and kind in ("extra_forbidden", "invalid_key"):
        return f"{loc[0]}: unknown section; allowed: {', '.join(root.model_fields)}"
    if len(loc) == 1:
        return f"{loc[0]}: must be a mapping of keys, got {shown!r}"
    key, fields = f"{loc[0]}.{loc[1]}", root.model_fields[loc[0]].annotation.model_fields
    if kind in ("extra_forbidden", "invalid_key"):
        return f"{key}: renamed to {renamed[key]}" if key in renamed else \
            f"{key}: unknown key; allowed: {', '.join(fields)}"
    if kind == "choice":
        return f"{key}: {shown!r} is not allowed; {error['msg']}"
    field = fields[loc[1]]
    bounds = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):  # the field's own bounds
        lo, hi = bounds.get("gt", bounds.get("ge", "-inf")), bounds.get("lt", bounds.get("le", "inf"))
        return (f"{key}: {shown!r} is outside the allowed range {'(' if 'gt' in bounds else '['}{lo}, {hi}"
                f"{')' if 'lt' in bounds else ']'}")
    expected = next(t for t in get_args(field.annotation) or (field.annotation,) if t is not type(None)).__name__
    return f"{key}: null is not allowed; expected {expected}" if shown is None else \
        f"{key}: {shown!r} is not a valid {expected}"


def validate(root: type[BaseModel], raw: Any, renamed: dict[str, str]) -> BaseModel:
    """`raw` (a dict of sections) as a `root` model; ConfigError names the first mistake as written: an unknown
    section, else the sections in their order and each one's keys in the order given."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections")
    raw = {section: values or {} for section, values in raw.items()}  # `section:` alone is an empty section
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        sections = list(root.model_fields)

        def where(loc: tuple) -> tuple:
            if loc[0] not in sections:
                return -1, 0
            return sections.index(loc[0]), [*raw[loc[0]]].index(loc[1]) if len(loc) > 1 else -1

        error = min(e.errors(), key=lambda error: where(error["loc"]))
        if len(error["loc"]) == 2 and isinstance(error["input"], float):  # as written: '5e-4' (YAML 1.1 read a str)
            error["input"] = raw[error["loc"][0]][error["loc"][1]]
        raise ConfigError(_one_line(error, root, renamed)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` into the dotted key and its YAML-parsed value."""
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set {text}: expected section.key=value (e.g. search.target=0.4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

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
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        section, name = key.split(".", 1)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: must be a mapping of keys")
        raw[section][name] = value
    return raw

