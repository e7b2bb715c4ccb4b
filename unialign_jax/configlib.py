"""Frozen dataclass configs: JSON round trip, dotted `key=value` overrides, a typed key list.

One mechanism for every configuration in the project — the models' (`MMDiTConfig`,
`T5Config`, `VAEConfig`, stored in checkpoints) and the run's nested `TrainConfig`. Values
of overrides are Python literals (`ast.literal_eval`, never `eval`), checked against the
field's type; a value that is not a literal is taken as a string (`workdir=gs://b/run`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Callable, ClassVar, Iterator, Mapping


class JsonConfig:
    """Mixin for a frozen dataclass: `to_dict()` and a `from_dict()` that names unknown
    fields and rebuilds nested dataclasses and tuples."""

    # Retired keys still read, by config files, overrides and older config.json files:
    # {old name: function(config, value) -> config with the value in its new place}.
    # `to_dict` writes only the current fields.
    ALIASES: ClassVar[Mapping[str, Callable[[Any, Any], Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return from_dict(cls, d)


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass (string annotations resolved once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _options(hint) -> tuple:
    """The alternatives of a union type (`int | None` → (int, NoneType)), else (hint,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _nested_class(hint):
    """The dataclass among a field's type alternatives, if any."""
    return next((o for o in _options(hint) if dataclasses.is_dataclass(o)), None)


def from_dict(cls, d: dict[str, Any]):
    """`cls(**d)` with nested dataclasses rebuilt from dicts and lists turned into tuples."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
    types_ = field_types(cls)
    aliases = getattr(cls, "ALIASES", {})
    unknown = set(d) - set(types_) - set(aliases)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {}
    for name, value in d.items():
        if name in aliases:
            continue
        nested = _nested_class(types_[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    config = cls(**values)
    for name in aliases:
        if name in d:
            config = aliases[name](config, d[name])
    return config


def parse_value(text: str) -> Any:
    """A Python literal, or the text itself when it is not one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _type_name(hint) -> str:
    return " | ".join("None" if o is type(None) else getattr(o, "__name__", str(o))
                      for o in _options(hint))


def check_type(key: str, hint, value: Any) -> Any:
    """`value` converted to the field type `hint` (ints for floats, strings and lists for
    tuples, dicts for nested configs), or ValueError naming the key and the type."""
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return None
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif origin is tuple and isinstance(value, (tuple, list, str)):
            return (value,) if isinstance(value, str) else tuple(value)
        elif dataclasses.is_dataclass(option) and isinstance(value, (dict, option)):
            return value
        elif origin is typing.Literal and value in typing.get_args(option):
            return value
        elif isinstance(origin, type) and isinstance(value, origin) and not (
                origin is int and isinstance(value, bool)):
            return value
    raise ValueError(f"{key}={value!r}: expected {_type_name(hint)}, got "
                     f"{type(value).__name__}")


def replace_path(config, path: list[str], value: Any, key: str):
    """A copy of `config` with the (possibly nested) field at `path` set to `value`; a
    dict given for a nested config updates only the fields it names."""
    types_ = field_types(type(config))
    name = path[0]
    alias = getattr(config, "ALIASES", {}).get(name)
    if alias is not None and len(path) == 1:
        return alias(config, value)
    if name not in types_:
        raise KeyError(name)
    current = getattr(config, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise KeyError(".".join(path))
        return dataclasses.replace(config, **{name: replace_path(current, path[1:], value, key)})
    value = check_type(key, types_[name], value)
    nested = _nested_class(types_[name])
    if nested is not None and isinstance(value, dict):
        base = current if dataclasses.is_dataclass(current) else nested()
        for sub, sub_value in value.items():
            base = replace_path(base, [sub], sub_value, f"{key}.{sub}")
        value = base
    return dataclasses.replace(config, **{name: value})


def iter_keys(cls, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, type) of every leaf field, nested configs expanded."""
    for name, hint in field_types(cls).items():
        nested = _nested_class(hint)
        if nested is not None and type(None) not in _options(hint):
            yield from iter_keys(nested, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def get_path(config, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _did_you_mean(key: str, leaves: list[str]) -> list[str]:
    """The same field in another section (optimiser.lr -> optimizer.lr), else the nearest
    spellings of the field within its section (optimizer.lrr -> optimizer.lr)."""
    section, _, name = key.rpartition(".")
    same_name = [k for k in leaves if k.rpartition(".")[2] == name]
    if same_name:
        return same_name
    siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == section}
    return [siblings[n] for n in difflib.get_close_matches(name, list(siblings), n=3,
                                                             cutoff=0.6)]


def apply_overrides(config, overrides: list[str]):
    """`key=value` overrides (dotted keys into nested sections) onto a copy of `config`."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            config = replace_path(config, key.split("."), parse_value(text), key)
        except KeyError:
            leaves = [k for k, _ in iter_keys(type(config))]
            close = _did_you_mean(key, leaves)
            raise ValueError(f"unknown config key {key!r}"
                             + (f"; did you mean {' or '.join(close)}?" if close else
                                "; --help lists every key")) from None
    return config


def describe(config) -> list[str]:
    """`key: type = value` lines for every leaf of `config` (for --help and --print-config)."""
    return [f"{key}: {_type_name(hint)} = {get_path(config, key)!r}"
            for key, hint in iter_keys(type(config))]
