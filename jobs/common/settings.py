"""Settings declared once: command-line flags built from config dataclasses, YAML under them.

A config dataclass is the one declaration of a setting: its field holds the name, the type, the
default and, in `field(metadata=...)`, the help text; its `__post_init__` holds the checks. This
module turns such a class into argparse flags and parsed flags back into the class, with a YAML
file (`--config`) in between: dataclass defaults < YAML values < flags given on the command line.

A settings record (the JSON-ready mapping a job stores of what made its results) is compared
here too: `settings_difference` names what differs between two, the one wording of every refusal
to resume or reuse results made with other settings (annotate, crops, prepare, train).

Field metadata read here:
- "help": the flag's help text (the default is appended).
- "flag": the flag's name when it is not `--field-name` (e.g. "--workers"); "aliases": more names.
- "cli": False keeps a field off the command line (YAML can still set it).
- "nested": for a field holding a config dataclass, the prefix of its fields' flags ("" flattens
  them); "fields": which of its fields get flags (default all); "aliases": more flag names of
  its fields, by field name. A nested field that may be None gets an on/off flag of its own
  (`--augment/--no-augment`).
- "choices": the values a string field takes.
- "positional": True makes the field a positional argument (its "metavar" names it in help).
- "metavar": how help names a flag's value (default the field name in capitals).
- "parse": the function that turns the flag's text into the value, where the field's type alone
  does not say (e.g. a field that also takes objects only Python callers pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: Separates the levels of a nested setting in argparse destinations: "samples.negative_iou".
_SEP = "."


# -- flags ------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                         *, required: Sequence[str] = (), exclude: Sequence[str] = (),
                         only: Sequence[str] | None = None, dest_prefix: str = "",
                         defaults: Any = None, _prefix: str = "", _aliases: dict | None = None) -> None:
    """Add a flag for every command-line field of the dataclass cls (nested ones flattened).

    `required` and `exclude` name fields by their dotted path ("samples.stage"), `only` the
    fields of cls that get flags (default all); dest_prefix goes before every destination
    ("detector." keeps a nested config's flags apart, see `given_under`). Flags default
    to argparse.SUPPRESS, so the parsed namespace holds only what was given and
    `config_from_args` can lay it over the YAML values.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        if (dest in exclude or not f.metadata.get("cli", True) or not f.init
                or (only is not None and f.name not in only)):
            continue
        default = _default(f) if defaults is None else getattr(defaults, f.name)
        kind = hints[f.name]
        nested = _dataclass_in(kind)
        if nested is not None:
            prefix = _prefix + f.metadata.get("nested", "")
            if _allows_none(kind):
                parser.add_argument(_flag(f, _prefix), dest=dest + _SEP + "enabled",
                                    action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                    help=_help(f, default is not None and "on" or "off"))
            add_config_arguments(parser, nested, required=required, exclude=exclude,
                                 only=f.metadata.get("fields"), dest_prefix=dest + _SEP, _prefix=prefix,
                                 defaults=default if default is not None else nested(),
                                 _aliases=f.metadata.get("aliases"))
            continue
        if f.metadata.get("positional"):
            parser.add_argument(dest, metavar=f.metadata.get("metavar", f.name.upper()),
                                type=f.metadata.get("parse") or _parser_for(kind, f.name),
                                help=f.metadata.get("help", ""))
            continue
        names = [_flag(f, _prefix), *f.metadata.get("aliases", ()), *(_aliases or {}).get(f.name, ())]
        metavar = f.metadata.get("metavar", f.name.upper())
        options: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "metavar": metavar}
        if dest in required:
            options["required"] = True
        if _strip_none(kind) is bool:
            options.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif _sequence_of_str(kind):
            options.update(nargs="+", action="extend")
        else:
            options["type"] = f.metadata.get("parse") or _parser_for(kind, names[0])
            if options["type"] is str and f.metadata.get("choices"):
                options.update(choices=f.metadata["choices"], metavar=None)
        options["help"] = _help(f, _shown(default))
        parser.add_argument(*names, **options)


def _flag(f: dataclasses.Field, prefix: str) -> str:
    if "flag" in f.metadata and not prefix:
        return f.metadata["flag"]
    return "--" + (prefix + f.name).replace("_", "-")


def _help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata.get("help", "")
    if default is None or default == "None":
        return text
    return f"{text} (default {default})" if text else f"(default {default})"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "%s" % (value,)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _strip_none(kind: Any) -> Any:
    """X from X | None (and Optional[X]); kind itself otherwise."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if _is_union(kind) and len(args) == 1:
        return args[0]
    return kind


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _allows_none(kind: Any) -> bool:
    return _is_union(kind) and type(None) in typing.get_args(kind)


def _dataclass_in(kind: Any) -> type | None:
    kind = _strip_none(kind)
    return kind if dataclasses.is_dataclass(kind) else None


def _sequence_of_str(kind: Any) -> bool:
    """Whether kind takes several strings (str | Sequence[str] and the like)."""
    options = typing.get_args(kind) if _is_union(kind) else (kind,)
    return any(typing.get_origin(o) in (Sequence, list, tuple) and typing.get_args(o)[:1] == (str,)
               for o in options)


def _parser_for(kind: Any, flag: str):
    """The argparse type function of a field type: int, float, str, fixed tuples, JSON objects."""
    kind = _strip_none(kind)
    if kind in (int, float, str):
        return kind
    if kind is dict or typing.get_origin(kind) is dict:
        return _json_object(flag)
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if items and items[-1] is not Ellipsis:
            return _numbers(flag, items[0], len(items))
    if _is_union(kind):
        # e.g. int | tuple[int, int]: N or MIN,MAX.
        return _int_or_pair(flag)
    raise TypeError(f"no command-line form for {flag} of type {kind}")


def _numbers(flag: str, item: type, count: int):
    def parse(text: str) -> tuple:
        try:
            values = tuple(item(part) for part in text.replace(",", " ").split())
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{flag} takes {count} comma-separated numbers, got {text!r}")
        return values
    return parse


def _int_or_pair(flag: str):
    def parse(text: str) -> int | tuple[int, int]:
        try:
            if "," in text:
                low, high = text.split(",", 1)
                return int(low), int(high)
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes N or MIN,MAX, got {text!r}") from None
    return parse


def _json_object(flag: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object: {error.msg}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, e.g. "
                                             '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
        return value
    return parse


# -- values -----------------------------------------------------------------------------------

def given(args: argparse.Namespace, cls: type) -> dict:
    """The settings of cls given on the command line, nested by their destinations."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    for dest, value in vars(args).items():
        *parents, name = dest.split(_SEP)
        if (parents[0] if parents else name) not in names:
            continue
        level = values
        for parent in parents:
            level = level.setdefault(parent, {})
        level[name] = value
    return values


def given_under(args: argparse.Namespace, prefix: str) -> dict:
    """The settings given on the command line under a dest_prefix such as "detector."."""
    return {dest[len(prefix):]: value for dest, value in vars(args).items() if dest.startswith(prefix)}


def merge(base: dict, overrides: dict) -> dict:
    """base with overrides laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build(cls: type, values: dict, where: str = "settings"):
    """An instance of the dataclass cls from a (nested) mapping; unknown keys are named."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_in(hints[name])
        if nested is not None and isinstance(value, dict):
            value = dict(value)
            enabled = value.pop("enabled", True)
            if not enabled:
                kwargs[name] = None
                continue
            default = _default(fields[name])
            if dataclasses.is_dataclass(default):
                value = merge(as_values(default), value)
            value = build(nested, value, f"{where}: {name}")
        elif isinstance(value, list) and typing.get_origin(_strip_none(hints[name])) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def as_values(config: Any) -> dict:
    """A config dataclass as a nested mapping of its init fields (what `build` takes back)."""
    return {f.name: (as_values(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v)
            for f in dataclasses.fields(config) if f.init}


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML settings file (ValueError naming the file if there is none)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def config_from_args(cls: type, args: argparse.Namespace, config_file: str | Path | None = None,
                     base: dict | None = None, required: Sequence[str] = ()):
    """cls from its defaults, then base, then the YAML file, then the flags given (last wins).

    `required` names settings (dotted paths) that the file or the flags must give.
    """
    values = dict(base or {})
    if config_file:
        values = merge(values, read_yaml(config_file))
    values = merge(values, given(args, cls))
    for path in required:
        level = values
        for part in path.split(_SEP):
            level = level.get(part) if isinstance(level, dict) else None
        if level is None:
            flag = "--" + path.split(_SEP)[-1].replace("_", "-")
            raise ValueError(f"give {flag}" + (f" (or {path} in {config_file})" if config_file else ""))
    return build(cls, values, str(config_file or "settings"))


# -- settings records -------------------------------------------------------------------------

#: A changed value longer than this is cut short in messages.
_SHOWN_CHARS = 80
_ABSENT = object()


def setting_changes(before: dict, now: dict, _prefix: str = "") -> list[str]:
    """Each setting that differs between two settings records, as 'key earlier -> now'.

    Nested mappings are compared key by key and named by dotted keys ('detector.min_face_size');
    values are shown as JSON (cut short past 80 characters), a key one record lacks as (none).
    """
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        old, new = before.get(key, _ABSENT), now.get(key, _ABSENT)
        name = f"{_prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes += setting_changes(old, new, name + _SEP)
        elif old != new:
            changes.append(f"{name} {_value_text(old)} -> {_value_text(new)}")
    return changes


def settings_difference(before: dict, now: dict) -> str:
    """Which settings differ, e.g. 'detector.min_face_size 20.0 -> 40.0, batch_size 16 -> 8'
    (see `setting_changes`); 'unknown' when none does."""
    return ", ".join(setting_changes(before, now)) or "unknown"


def _value_text(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    text = json.dumps(value, default=str)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."
