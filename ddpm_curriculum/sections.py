"""Typed JSON sections, generically: ``opt`` fields with documentation and ranges, building a dataclass from
a JSON-like dict with one-line errors (key path, bad value, valid choices, the nearest key for typos),
strict JSON reading (duplicate keys are errors) and dotted ``--set`` overrides. Knows nothing of this project's
schema, which is ``config.py``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import UserError


def opt(default, doc: str, *, choices=None, lo=None, hi=None, lo_open=False):
    """A config field: default, documentation, and the allowed values or numeric range."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: str):
    """Check ``value`` against the annotation ``tp`` and return it converted (int → float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"config key '{path}' must be a mapping of names, got {value!r:.80}")
        return {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{path}' must be a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise UserError(f"config key '{path}' has {len(str(value))} digits, too large for a number") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")


def field_choices(meta: dict) -> list | None:
    """A field's valid values; a callable (a registry's names, read when needed) is called."""
    choices = meta.get("choices")
    return choices() if callable(choices) else choices


def _check_range(value, meta: dict, path: str) -> None:
    if value is None:
        return
    choices = field_choices(meta)
    if choices is not None and value not in choices:
        raise UserError(f"config key '{path}' = {value!r} is not one of {choices}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"config key '{path}' = {value!r} must be finite")
        if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
            raise UserError(f"config key '{path}' = {value!r} must be "
                            f"{'>' if meta.get('lo_open') else '>='} {lo}")
        if hi is not None and value > hi:
            raise UserError(f"config key '{path}' = {value!r} must be <= {hi}")


def key_aliases(cls) -> dict[str, str]:
    """Other names a section accepts for its keys (alias → key), from its class attribute ``KEY_ALIASES``
    (not annotated, so not a field); resolved configs use the key."""
    return getattr(cls, "KEY_ALIASES", {})


def _resolve_aliases(cls, data: dict, path: str) -> dict:
    aliases = key_aliases(cls)
    if not any(k in aliases for k in data):
        return data
    out = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in out or (name != key and name in data):
            full = f"{path}.{name}" if path else name
            raise UserError(f"config key '{full}' is given twice (as '{name}' and its alias '{key}'); keep one")
        out[name] = value
    return out


def _build(cls, data, path: str):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with a nearest-key hint."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{path}' must be a JSON object, got {data!r}")
    data = _resolve_aliases(cls, data, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue  # comment keys, as in the seeds' configs
        full = f"{path}.{key}" if path else key
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UserError(f"unknown config key '{full}'{hint}; valid keys: {sorted(fields)}")
        value = _convert(value, hints[key], full)
        _check_range(value, fields[key].metadata, full)
        kwargs[key] = value
    return cls(**kwargs)


def build_section(cls, data, path: str = ""):
    """Build and check any ``opt``-declared dataclass from a JSON-like dict (same rules as configs)."""
    return _build(cls, data, path)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` of every JSON read: a key given twice is an error, not silently last-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(text: str, where: str):
    """``json.loads`` with one-line UserErrors: invalid JSON, a repeated key, nesting too deep for Python."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise UserError(f"{where} gives the key '{exc.args[0]}' twice (JSON would keep only the last); "
                        f"remove one") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply for Python to read; check the file") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with more digits than Python converts
        raise UserError(f"{where} is not valid JSON: {str(exc)[:200]}") from None


def read_json_file(path: str | Path, what: str, example: str):
    """The parsed contents of a JSON file; a missing, unreadable or malformed file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} (pass an existing JSON file, e.g. {example})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        f"save it as UTF-8 JSON") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return parse_json(text, f"{what} {path}")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (metrics.jsonl, results.jsonl; [] when absent). A torn last line, as a
    killed writer leaves it, is skipped; a damaged line elsewhere is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(parse_json(line, f"{path} line {n}"))
        except UserError:
            if n < len(lines):
                raise
    return records


def parse_override_value(text: str):
    """Value of a ``--set`` item: JSON when it parses (numbers, booleans, lists, null), else a string."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return text  # not JSON: a plain string such as a dataset name
    except (ValueError, RecursionError):
        pass  # JSON that Python cannot hold: parse_json names the problem
    return parse_json(text, f"--set value {text[:40]!r}")


def apply_override(raw: dict, item: str, root) -> None:
    """Apply one ``section.key=value`` (or ``section.list.INDEX.key=value``, or ``key=value`` for a top-level key
    that is not a section) override to ``raw``, a JSON-like dict of the dataclass ``root``."""
    if "=" not in item:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if keys in ([k] for k in top_level_keys(root)):  # a key of no section, e.g. --set mode=CS
        raw[keys[0]] = parse_override_value(text)
        return
    if len(keys) < 2 or not all(keys):
        raise UserError(f"--set expects section.key=value, got {item!r}")
    node = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdecimal() or int(key) >= len(node):
                raise UserError(f"--set {dotted}: index {key!r} is out of range; '{'.'.join(keys[:i])}' is a "
                                f"list of {len(node)} (index 0 … {len(node) - 1})")
            if last:
                node[int(key)] = parse_override_value(text)
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):  # the path runs through a number, string or null
            raise UserError(f"--set {dotted}: '{'.'.join(keys[:i])}' is a value, not a section; "
                            f"set '{'.'.join(keys[:i])}' itself")
        if last:
            node[key] = parse_override_value(text)
        elif key not in node:
            if i == 0 and key not in {f.name for f in dataclasses.fields(root)}:
                near = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(root)], n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise UserError(f"--set {dotted}: unknown config section '{key}'{hint}")
            node[key] = {}
            node = node[key]
        else:
            node = node[key]


def top_level_keys(root) -> tuple[str, ...]:
    """Keys of ``root`` that are values, not sections (no default_factory), e.g. Config's ``mode``."""
    return tuple(f.name for f in dataclasses.fields(root) if f.default_factory is dataclasses.MISSING)
