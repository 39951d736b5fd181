"""Every flag of every verb reaches the library function it configures.

Each verb is glue: flags generated from a typed config, the parsed config passed whole to a library
stage `stage(config) -> result`. This walks every verb the CLI has, sets each of its config's fields on
the command line (alone, to a value other than its default), runs the verb's dispatch with the stage
replaced by a recorder, and checks that the stage received that value: a handler that dropped or
renamed a field would fail here (the bug class of the old `serve --registry`).
"""

from __future__ import annotations

import argparse
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from binsight.cli import build_parser
from binsight.cliargs import dispatch
from binsight.errors import BinsightError

# Values that pass a field's own validation where a generic one would not.
VALID = {
    "arch": "efficientnet_lite1",
    "archs": "resnet34,resnet18",
    "head": "ordinal",
    "s3_allow": "s3://bins/photos/",
    "allowed_hosts": "binsight.example",
    "allow_roots": "s3://bins/more/",
    "url": "http://127.0.0.1:9/invocations",
    "target": "v0002",
    "storage": "sqlite:////tmp/reach.db",
    "recheck_storage": "sqlite:////tmp/reach.db",
    "run_id": "run-7",
    "alias": "staging",
    "registry": "/tmp/reach-registry",
    "source": "/tmp/reach.csv",
    "s3_endpoint_url": "http://127.0.0.1:9",
    "endpoint_url": "http://127.0.0.1:9",
    "device": "cpu",
    "ray": "auto",
    "name": "camera-9",
    "cache_views": "o,v",
    "teachers": "/tmp/t1.pt,/tmp/t2.pt",
    "checkpoints": "/tmp/a.pt,/tmp/b.pt",
    "version": "v-reach",
    "bucket": "other-bucket",
    "images_prefix": "photos/",
    "metadata_prefix": "meta/",
    "ids": "1,2",
    "checkpoint_dir": "/tmp/reach-checkpoints",
    "class_weights": "1,1,1,1,1,2",
    "image_width": "304",
}
# Fields only valid beside another one.
WITH = {
    "per_class": ["--classes", "0-5"],
    # Stochastic depth and layer-wise rates need a timm backbone; the default arch is torchvision's.
    "layer_decay": ["--arch", "efficientnet_lite0"],
    "drop_path": ["--arch", "efficientnet_lite0"],
    "init_shrink": ["--init-from", "/tmp/reach-run/best.pt"],  # a start to shrink towards
}
# Fields that need a partner given with them, or one taken away (exactly one model source).
INSTEAD = {"registry": "model"}
REQUIRED = {
    Path: "/tmp/reach-required",
    str: "required",
}


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.get_default("run") is not None:
                    found[(*path, name)] = sub
                found |= leaf_parsers(sub, (*path, name))
    return found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def candidates(name: str, field: Any) -> list[list[str]]:
    """Command-line spellings of values other than the default, most likely to validate first."""
    annotation, default = _unwrap(field.annotation), field.get_default(call_default_factory=True)
    flag = _flag(name)
    if name in VALID:
        return [[flag, VALID[name]]]
    if annotation is bool and name.startswith("no_"):
        return [[flag]]
    if annotation is bool:
        return [[flag] if not default else ["--no-" + name.replace("_", "-")]]
    if typing.get_origin(annotation) is typing.Literal:
        return [[flag, str(choice)] for choice in typing.get_args(annotation) if choice != default]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [[flag, m.value] for m in annotation if m != default]
    if annotation is int:
        base = default if isinstance(default, int) else 3
        return [[flag, str(v)] for v in (base + 1, base - 1, base * 2, 1, 2, 7) if v != default]
    if annotation is float:
        base = default if isinstance(default, float | int) else 0.5
        return [[flag, str(v)] for v in (base / 2, base * 0.9, 0.3, 0.01, base + 0.1, 2.0) if v != default]
    if annotation is str:
        return [[flag, f"reach-{name}"]]
    if annotation is Path:
        return [[flag, f"/tmp/reach/{name}"]]
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(members) == 2 and members[1] is not Ellipsis:
        return [[flag, "2:3"], [flag, "0.001:0.01"], [flag, "1:2"]]
    if origin in (list, tuple):
        item = members[0]
        if isinstance(item, type) and issubclass(item, enum.Enum):
            return [[flag, ",".join(m.value for m in item)], [flag, list(item)[-1].value]]
        if item is int:
            return [[flag, "3,5"]]
        if item is Path:
            return [[flag, "/tmp/a,/tmp/b"]]
        return [[flag, "alpha,beta"]]
    if origin is dict:
        return [[flag, json.dumps({"image_size": 96})]]
    raise AssertionError(f"no candidate value for {name}: {annotation!r}")


def required_args(parser: argparse.ArgumentParser, model: type[BaseModel]) -> list[str]:
    """Values for the config's required fields (positionals by position, others as flags)."""
    positional = [a.dest for a in parser._actions if not a.option_strings and a.dest in model.model_fields]
    args: list[str] = []
    for name, field in model.model_fields.items():
        if not field.is_required() and not (name == "model" and "registry" in model.model_fields):
            continue
        annotation = _unwrap(field.annotation)
        value = VALID.get(name, REQUIRED.get(annotation, "/tmp/reach-required"))
        if name == "model":  # one model source: the file, unless a test gives the registry instead
            value = "/tmp/reach-model.onnx"
        args += [value] if name in positional else [_flag(name), value]
    return args


def run_verb(argv: list[str]) -> BaseModel:
    parser = build_parser()
    args = parser.parse_args(argv)
    received: list[BaseModel] = []
    args.run = lambda config: received.append(config)
    args.report = None
    dispatch(args)
    return received[0]


@pytest.mark.parametrize("verb", sorted(" ".join(p) for p in leaf_parsers(build_parser())))
def test_every_field_of_the_verb_reaches_its_stage(verb: str) -> None:
    path = verb.split()
    parser = leaf_parsers(build_parser())[tuple(path)]
    model: type[BaseModel] = parser.get_default("config_model")
    base = required_args(parser, model)
    positional = [a.dest for a in parser._actions if not a.option_strings and a.dest in model.model_fields]
    baseline = run_verb([*path, *base])
    unchecked = []
    for name, field in model.model_fields.items():
        if field.is_required() or name in ("model",):
            continue  # given above, and seen in `baseline`
        reached = False
        for spelling in candidates(name, field):
            if name in positional:  # ACTION, TARGET, SOURCE: a value in its place, after those before it
                before = [str(model.model_fields[p].default) for p in positional[: positional.index(name)]]
                argv = [*path, *before, spelling[-1], *base]
            else:
                argv = [*path, *base, *spelling, *WITH.get(name, [])]
            if name in INSTEAD:  # e.g. --registry instead of --model
                drop = _flag(INSTEAD[name])
                argv = [a for i, a in enumerate(argv) if a != drop and (i == 0 or argv[i - 1] != drop)]
            try:
                config = run_verb(argv)
            except (BinsightError, ValidationError, SystemExit):
                continue
            assert getattr(config, name) != getattr(baseline, name), (verb, name, spelling)
            reached = True
            break
        if not reached and candidates(name, field):  # a one-value Literal has nothing to vary
            unchecked.append(name)
    assert unchecked == [], f"{verb}: no accepted value reached the stage for {unchecked}"
