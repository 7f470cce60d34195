"""How a settings dataclass meets the outside world: a field declared with `option` is a flag (its help, choices
and simple rules) and a config-file key. A config file (YAML or TOML) holds the same keys as the flags in
snake_case; flags override the file; unknown keys and wrong types are errors that name the key. `to_dict`
gives what a run records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from dreambooth.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# Settings that were renamed: old name -> (new name, the one line that using the old name, as a flag or a
# config-file key, fails with).
RENAMED = {
    "validation_steps": ("validation_sampling_steps",
                         "--validation-steps is now --validation-sampling-steps (sampling steps of each validation "
                         "image); how often to render validation images is --validation-every"),
}


RUN_RECORD = "_run"  # the key under which RUN/config.yaml records the run itself, beside its settings


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           positive: bool = False, non_negative: bool = False, non_empty: bool = False, cli: bool = True,
           positional: bool = False) -> Any:
    """A dataclass field carrying its CLI help and simple validation rules (positional: `cmd VALUE`, not `--flag`;
    non_empty: text that must hold more than spaces, as every required text field must)."""
    metadata = {"help": help, "choices": choices, "positive": positive, "non_negative": non_negative,
                "non_empty": non_empty, "cli": cli, "positional": positional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_fields(config: Any) -> None:
    """Check the per-field rules declared with `option` and that required fields are present."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if value is dataclasses.MISSING or value is None and _is_required(spec):
            raise UserError(f"missing {flag_name(spec.name)} (or `{spec.name}:` in the --config file)")
        rules = spec.metadata
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if rules.get("choices") and item not in rules["choices"]:
                raise UserError(f"{flag_name(spec.name)} {item}: choose one of {', '.join(rules['choices'])}")
            # An empty prompt trains or renders nothing in particular, and an empty path is the current folder
            # (where `--output ""` would write a run): both are a slip, such as an unset shell variable.
            if isinstance(item, str) and not item.strip() and (rules.get("non_empty") or _is_required(spec)):
                instead = "; drop the empty one" if isinstance(value, list) else (
                    "" if _is_required(spec) else "; leave the flag out instead")
                raise UserError(f"{flag_name(spec.name)} {item!r}: must not be empty{instead}")
        numbers = values
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if not math.isfinite(number):
                raise UserError(f"{flag_name(spec.name)} {number}: must be a finite number")
            if rules.get("positive") and number <= 0:
                raise UserError(f"{flag_name(spec.name)} {number}: must be greater than 0")
            if rules.get("non_negative") and number < 0:
                raise UserError(f"{flag_name(spec.name)} {number}: must not be negative")


def _is_required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict of settings."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
        raise UserError(f"--config {path}: not valid {kind} ({error})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: must hold a mapping of settings, not a {type(data).__name__}")
    return data


def build_config(cls: type, file_values: dict[str, Any], overrides: dict[str, Any], source: str = "--config file"):
    """Merge defaults < file values < flag overrides into a validated `cls`."""
    fields = {spec.name: spec for spec in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        if key == RUN_RECORD:
            continue  # RUN/config.yaml's account of what the run was made from: it resumes with --config
        name = key.replace("-", "_")
        if name in RENAMED and RENAMED[name][0] in fields:
            raise UserError(f"{source}: key '{key}': {RENAMED[name][1]}")
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}' (known keys: {', '.join(sorted(fields))})")
        values[name] = coerce(value, hints[name], f"{source}: key '{key}'")
    for name, value in overrides.items():
        if value is not None:
            values[name] = value
    for name, spec in fields.items():
        if name not in values and _is_required(spec):
            values[name] = None  # validate_fields names the missing flag
    return cls(**values)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a config-file value against a field's type hint, converting only where lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        return coerce(value, options[0], where)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [coerce(item, item_hint, where) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{where}: expected {type_name}, got {json.dumps(value, default=str)}")


def to_dict(config: Any) -> dict[str, Any]:
    """The settings as plain data, ready for YAML."""
    return dataclasses.asdict(config)


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Fields and their resolved type hints, for building the command line."""
    hints = typing.get_type_hints(cls)
    return [(spec, hints[spec.name]) for spec in dataclasses.fields(cls) if spec.metadata.get("cli", True)]
