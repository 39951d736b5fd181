"""Command-line flags generated from a pydantic config model, so a setting exists in one place.

Each field becomes `--field-name` with its type, its choices (a Literal) and its description as help;
flags left out keep the model's default (they parse to None and are dropped before validation).
`--config FILE` (JSON) supplies values that flags then override.
"""

from __future__ import annotations

import argparse
import enum
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ValidationError

from binsight.errors import BinsightError, invalid_settings
from binsight.utils.io import read_json_object

Config = TypeVar("Config", bound=BaseModel)
_SCALARS: dict[Any, Any] = {int: int, float: float, str: str, Path: Path}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            annotation = members[0]
    if typing.get_origin(annotation) is typing.Annotated:  # e.g. SecretUrl: a str with a serializer
        annotation = typing.get_args(annotation)[0]
    return annotation


def _composite_parser(annotation: Any, flag: str) -> tuple[str, Any] | None:
    """Command-line spellings of a range (`LOW:HIGH`), a list (`A,B,C`) and a JSON object."""
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(members) == 2 and members[0] == members[1] and members[0] in _SCALARS:
        kind = members[0]

        def as_range(text: str) -> tuple[Any, Any]:
            # Whole-number ranges may also be written LOW-HIGH (count ranges: 0-5).
            separator = "-" if kind is int and ":" not in text and "-" in text[1:] else ":"
            low, _, high = text.partition(separator)
            try:
                return kind(low), kind(high or low)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a range like LOW:HIGH") from None

        return "LOW:HIGH", as_range
    variadic = origin is tuple and len(members) == 2 and members[1] is Ellipsis
    listed = (origin is list and len(members) == 1) or variadic
    is_enum = listed and isinstance(members[0], type) and issubclass(members[0], enum.Enum)
    if listed and (members[0] in _SCALARS or is_enum):
        kind = members[0]

        def as_list(text: str) -> list[Any]:
            try:
                return [kind(part.strip()) for part in text.split(",") if part.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None

        return "A,B,...", as_list
    if origin is dict:

        def as_object(text: str) -> dict[str, Any]:
            try:
                return json_object(text, flag)
            except BinsightError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return "JSON", as_object
    return None


def add_config_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    skip: frozenset[str] | set[str] = frozenset(),
    positional: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """Flags for `model`'s fields; those in `positional` are positional arguments instead (optional on
    the command line, so that `--config` may give them)."""
    for name in positional:
        field = model.model_fields[name]
        kind = _SCALARS.get(_unwrap_optional(field.annotation), str)
        parser.add_argument(
            name, nargs="?", type=kind, default=None, metavar=name.upper(), help=field.description
        )
    parser.set_defaults(config_model=model)  # which settings the verb's arguments make
    group = parser.add_argument_group(title or f"{model.__name__} settings")
    group.add_argument("--config", type=Path, default=None, help="JSON file of settings; flags override it")
    for name, field in model.model_fields.items():
        if name in skip or name in positional:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = _unwrap_optional(field.annotation)
        if field.is_required():
            suffix = " (required, here or in --config)"
        else:
            default = field.get_default(call_default_factory=True)
            suffix = f" (default {default})" if default is not None else ""
        help_text = (field.description or "") + suffix
        if annotation is bool and name.startswith("no_"):
            # A switch already named in the negative (--no-auth): argparse's --X/--no-X pair would
            # read `--no-auth` as auth=False of a field called `auth`.
            group.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            group.add_argument(flag, choices=choices, default=None, help=help_text)
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            values = [member.value for member in annotation]
            group.add_argument(flag, choices=values, default=None, help=help_text)
        elif annotation in _SCALARS:
            group.add_argument(flag, type=_SCALARS[annotation], default=None, help=help_text)
        elif (parse := _composite_parser(annotation, flag)) is not None:
            metavar, convert = parse
            # A list flag may be repeated (`--s3-allow A --s3-allow B`) as well as comma-separated.
            action = "extend" if metavar == "A,B,..." else "store"
            group.add_argument(
                flag, type=convert, default=None, metavar=metavar, help=help_text, action=action
            )
        else:
            raise TypeError(f"{model.__name__}.{name}: no command-line form for {annotation!r}")


def add_command(
    verbs: Any,
    name: str,
    model: type[Config],
    run: Callable[[Config], Any],
    report: Callable[[Config, Any], int | None] | None = None,
    *,
    help: str,
    description: str | None = None,
    positional: tuple[str, ...] = (),
    title: str | None = None,
    make_config: Callable[[argparse.Namespace], Config] | None = None,
) -> argparse.ArgumentParser:
    """A verb is glue: its flags are generated from `model`; the parsed config goes, whole, to `run`
    (a library function `stage(config) -> result`), and `report` prints the result and returns the exit
    code. A handler never copies fields, so none can be dropped (tests/test_cli_configs.py)."""
    parser: argparse.ArgumentParser = verbs.add_parser(name, help=help, description=description)
    add_config_arguments(parser, model, positional=positional, title=title)
    parser.set_defaults(
        run=run, report=report, make_config=make_config or (lambda args: config_from_args(args, model))
    )
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Parse -> config -> call -> print, the same for every verb."""
    config = args.make_config(args)
    result = args.run(config)
    return int(args.report(config, result) or 0) if args.report else 0


def config_from_args(args: argparse.Namespace, model: type[Config], **fixed: Any) -> Config:
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(read_json_object(args.config, "settings file"))
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    values.update(fixed)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid_settings(exc) from None


def json_object(text: str, flag: str) -> dict[str, Any]:
    """A JSON object given on the command line (`flag` names it in the error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BinsightError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BinsightError(f"{flag} must be a JSON object of settings")
    return value
