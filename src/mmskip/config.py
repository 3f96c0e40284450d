"""Dataclass configs <-> command-line flags.

Each params.yaml section is flat and maps to one dataclass of :mod:`mmskip.params`, whose
field descriptions are the flags' help. Flags follow DVC's dictionary unpacking (``cmd: mmskip
train_mapper ${mapper}``, with ``parsing: {bool: boolean_optional, list: nargs}``): ``--key
value``, ``--key a b c`` for lists, ``--key``/``--no-key`` for booleans. ``cli_args`` renders
the same string for Snakemake rules, so both tools issue the identical command.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from typing import Any, Mapping


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[field.name]


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """Add one ``--<field>`` flag per dataclass field, defaulting to the field's default."""
    target = parser.add_argument_group(group or cls.__name__)
    for field in dataclasses.fields(cls):
        tp = _field_type(cls, field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("description", "").replace("%", "%%")  # argparse formats help with %
        origin = typing.get_origin(tp)
        if tp is bool:
            target.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif origin in (list, tuple):
            (item,) = set(typing.get_args(tp)) - {Ellipsis}
            target.add_argument(f"--{field.name}", nargs="+", type=item, default=default, help=help_text)
        elif origin in (typing.Union, types.UnionType):
            (item,) = [a for a in typing.get_args(tp) if a is not type(None)]
            target.add_argument(f"--{field.name}", type=_none_or(item), default=default, help=help_text)
        else:
            target.add_argument(f"--{field.name}", type=tp, default=default, help=help_text)


def _none_or(item: type):
    def parse(text: str):
        return None if text in ("None", "null") else item(text)
    parse.__name__ = item.__name__
    return parse


def dataclass_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if typing.get_origin(_field_type(cls, f)) is tuple:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def dataclass_from_dict(cls: type, values: Mapping[str, Any]):
    """Build ``cls`` from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; allowed: {sorted(names)}")
    return cls(**values)


def cli_args(section: Mapping[str, Any]) -> str:
    """Render a flat params section as DVC's dict unpacking would (boolean_optional, nargs)."""
    parts: list[str] = []
    for key, value in section.items():
        if isinstance(value, Mapping):
            raise ValueError(f"params section must be flat; key {key!r} holds a mapping")
        if isinstance(value, bool):
            parts.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"list parameter {key!r} is empty; give at least one value")
            parts.append(f"--{key} " + " ".join(shlex.quote(str(v)) for v in value))
        elif value is None:
            parts.append(f"--{key} None")
        else:
            parts.append(f"--{key} {shlex.quote(str(value))}")
    return " ".join(parts)
