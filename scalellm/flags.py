"""Configuration is data: command-line flags generated from frozen config dataclasses, and JSON.

A config dataclass documents each field with a docstring right below it; `add_config_flags` turns
every field into a flag whose help is that docstring, and `config_from_flags` builds the dataclass
back from the parsed flags (its own validation gives the errors, so a flag's values are checked in
one place). The flag of `max_num_seqs` is `--max-num-seqs` and its destination `max_num_seqs`;
booleans that default to True become `--no-NAME`, tuples repeatable flags. The caller may rename a
flag (`names`), give it aliases (`aliases`) or make it positional (`positional`).

Child processes get their whole config as one JSON document of the dataclass (`to_json` and
`from_json`, nested config dataclasses included), never as flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any, Iterable, TypeVar

Config = TypeVar("Config")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (and its dataclass bases), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, *, exclude: Iterable[str] = (),
                     defaults: Any = None, names: dict[str, str] | None = None,
                     aliases: dict[str, tuple[str, ...]] | None = None,
                     choices: dict[str, Iterable[str]] | None = None, positional: Iterable[str] = ()) -> None:
    """Add one flag per field of `cls` (but `exclude`) to `parser` (or an argument group).

    Defaults are `defaults`' values (the dataclass's own when None); each flag's destination is the
    field's name. `names` maps a field to its flag (for a boolean that defaults to True, the flag that
    turns it off), `aliases` to extra spellings, `choices` to the values argparse accepts; a
    `positional` field is an optional positional argument.
    """
    hints = typing.get_type_hints(cls)
    skipped, positional = set(exclude), set(positional)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skipped or not field.init:
            continue
        default = getattr(defaults, field.name) if defaults is not None else _default(field)
        help_text = docs.get(field.name, "").replace("%", "%%")
        if field.name in positional:
            parser.add_argument(field.name, nargs="?", default=default, help=help_text)
            continue
        flags = [(names or {}).get(field.name) or _flag(field.name, hints[field.name], default),
                 *(aliases or {}).get(field.name, ())]
        allowed = (choices or {}).get(field.name)
        _add_flag(parser, flags, field.name, hints[field.name], default, help_text,
                  None if allowed is None else list(allowed))


def config_from_flags(cls: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """The `cls` of the parsed flags (fields without a flag keep their defaults; `overrides` win).
    Raises the dataclass's ValueError on bad values."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
              if field.init and hasattr(args, field.name)}
    values.update(overrides)
    for field in dataclasses.fields(cls):
        if isinstance(values.get(field.name), list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


def to_flags(config: Any, *, exclude: Iterable[str] = (), names: dict[str, str] | None = None,
             positional: Iterable[str] = (), **_: Any) -> list[str]:
    """The command-line arguments that `add_config_flags` (with the same `exclude`, `names` and
    `positional`) parses back into `config`; fields at their default are left out."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    skipped, positional = set(exclude), set(positional)
    argv: list[str] = []
    for field in dataclasses.fields(cls):
        value, default = getattr(config, field.name), _default(field)
        if field.name in skipped or not field.init or value == default:
            continue
        if field.name in positional:
            argv.insert(0, str(value))
            continue
        flag = (names or {}).get(field.name) or _flag(field.name, hints[field.name], default)
        if _optional_inner(hints[field.name]) is bool:
            argv.append(flag)
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def to_json(config: Any) -> str:
    """One line of JSON holding every field of a config dataclass (nested ones included)."""
    return json.dumps(dataclasses.asdict(config), separators=(",", ":"))


def from_json(cls: type[Config], text: str | bytes) -> Config:
    """The `cls` that `to_json` wrote; ValueError when the JSON does not describe one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON {cls.__name__}: {error}") from None
    return from_dict(cls, data)


def from_dict(cls: type[Config], data: Any) -> Config:
    """Build `cls` from the dict `dataclasses.asdict` gives, nested dataclasses and tuples included."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} is a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**{name: _from_value(hints[name], value) for name, value in data.items()})


def _from_value(hint: Any, value: Any) -> Any:
    inner = _optional_inner(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(inner):
        return from_dict(inner, value)
    if typing.get_origin(inner) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _optional_inner(hint: Any) -> Any:
    """X for `X | None` (and Optional[X]); `hint` itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _flag(name: str, hint: Any, default: Any) -> str:
    """--NAME-WITH-DASHES; --no-NAME for a boolean that defaults to True."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if _optional_inner(hint) is bool and default else f"--{flag}"


def _add_flag(parser, flags: list[str], name: str, hint: Any, default: Any, help_text: str,
              choices: list[str] | None) -> None:
    kind = _optional_inner(hint)
    if kind is bool:
        if default:
            help_text += " On unless this flag is given."
        parser.add_argument(*flags, dest=name, action="store_false" if default else "store_true",
                            default=bool(default), help=help_text)
        return
    if default is not None and default != ():
        help_text += " (default %(default)s)"
    metavar = name.rsplit("_", 1)[-1].upper()
    if typing.get_origin(kind) is tuple:
        parser.add_argument(*flags, dest=name, action="append", type=typing.get_args(kind)[0],
                            default=list(default or ()), metavar=metavar, help=help_text + " (repeatable)")
        return
    if kind not in (int, float, str):
        raise TypeError(f"no flag for the field {name}: {hint}")
    if choices is not None:
        help_text += f" One of: {', '.join(choices)}."
    parser.add_argument(*flags, dest=name, type=kind, default=default, metavar=metavar, choices=choices,
                        help=help_text)
