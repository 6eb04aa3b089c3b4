"""Megatron-style command-line flags generated from typed configuration dataclasses.

A configuration section is a dataclass whose fields are declared with ``option(...)``: the field
is the single definition of a setting: its type, default, help, allowed values and flag name.
From it come the argparse flags (``add_flags``), the section built from parsed flags
(``from_namespace``) and the checking of YAML values (``check_value``), so a flag, its YAML key and
its dataclass field can never disagree.

Flag names: ``--`` + the field name with dashes, unless the field sets ``flag=``; the argparse
destination (and YAML key) is the flag name with underscores. Types: ``bool`` (a switch),
``int``, ``float``, ``str``, ``Optional[...]`` of them, ``list[str]`` (one or more values), or
any type with a ``parse=`` function for its text form.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Optional, Sequence


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and the fix. The base of every
    configuration error of the package (reported as one line, exit status 2)."""


class FlagError(ConfigError):
    """A flag or configuration value of the wrong type or out of its choices; the message names
    the setting, where it came from, and what is expected."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Optional[Sequence[Any]] = None,
    flag: Optional[str] = None,
    parse: Optional[Callable[[str], Any]] = None,
    expects: Optional[str] = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring).

    ``parse`` turns the flag's text into the value (raising ValueError); ``expects`` says what
    it accepts, for error messages.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag,
                "parse": parse, "expects": expects}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def dest(field: dataclasses.Field) -> str:
    """The argparse destination and YAML key of ``field``."""
    return flag_name(field)[2:].replace("-", "_")


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with ``option``."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, Sequence, tuple)


def _expected(annotation: Any, field: dataclasses.Field) -> str:
    base, optional = _unwrap_optional(annotation)
    if field.metadata.get("choices"):
        text = "one of " + ", ".join(map(str, field.metadata["choices"]))
    else:
        text = field.metadata.get("expects") or _type_name(base)
    return text + (" or null" if optional else "")


def _type_name(annotation: Any) -> str:
    if _is_list(annotation):
        return "a list of strings or numbers (or one string)"
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str,
              with_defaults: bool = False) -> None:
    """Add one argument group titled ``title`` with the flags of section ``cls``. Every flag's
    parser default is ``None`` (not given, so given flags can be told from defaults), or, with
    ``with_defaults``, the field's default (for parsers that read the values directly, such as
    Megatron-LM's)."""
    group = parser.add_argument_group(title)
    types = _field_types(cls)
    for field in flag_fields(cls):
        base, _ = _unwrap_optional(types[field.name])
        default = field.default if with_defaults and field.default is not dataclasses.MISSING \
            else None
        kwargs: dict[str, Any] = {"dest": dest(field), "default": default,
                                  "help": _help(field), "choices": field.metadata["choices"]}
        if base is bool:
            kwargs.pop("choices")
            kwargs["action"] = "store_true"
        elif _is_list(base):
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = field.metadata["parse"] or base
        group.add_argument(flag_name(field), **kwargs)


def _help(field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else None
    text = field.metadata["help"]
    if default not in (None, False, ""):
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")


def check_value(cls: type, field: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` (from YAML or a stored configuration) checked against ``field``'s type and
    choices; ints are accepted for floats, one string for a list. Raises FlagError naming the key,
    ``source`` and the expected type."""
    annotation = _field_types(cls)[field.name]
    base, optional = _unwrap_optional(annotation)
    key = dest(field)

    def fail() -> FlagError:
        return FlagError(f"{source}: {key}: {value!r} is not {_expected(annotation, field)} "
                         f"(the value of {flag_name(field)})")

    if value is None:
        if optional or field.default is None:
            return None
        raise fail()
    parse = field.metadata.get("parse")
    if base is bool:
        if not isinstance(value, bool):
            raise fail()
    elif _is_list(base):
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(
                v, (str, int, float)) for v in value):
            raise fail()
        value = [str(v) for v in value]  # e.g. data_path: [0.5, /data/a, 0.5, /data/b]
    elif parse is not None:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail()
        try:
            value = parse(value if isinstance(value, str) else repr(value))
        except (ValueError, argparse.ArgumentTypeError):
            raise fail() from None
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        value = float(value)
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
    elif base is str:
        if not isinstance(value, str):
            raise fail()
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise fail()
    return value


def from_namespace(cls: type, namespace: argparse.Namespace | dict, **extra: Any) -> Any:
    """Section ``cls`` from parsed flags (or a dict keyed by flag destination); a flag that is
    absent or ``None`` takes the field's default."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    kwargs = {}
    for field in flag_fields(cls):
        value = values.get(dest(field))
        if value is not None:
            kwargs[field.name] = value
    return cls(**kwargs, **extra)
