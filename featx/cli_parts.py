"""What the `featx` commands share, wherever they are defined: options generated from the
stage configs, the console, table cells.

A command lists its config class; every field of it becomes an option (or an argument) with
the field's name, default, description and constraints, so each option is declared once.
Values are validated by the config, not by the command line, so one error lists every
problem at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
console = Console(stderr=True)
RAY_ENV = {"ray_address": "RAY_ADDRESS"}  # the env var Ray's own tools read


def parse(config_cls, values: dict):
    """The config of `values`; its checks of paths run once, where the stage starts."""
    return config_cls.parse(**{k: v for k, v in values.items() if k in config_cls.model_fields})


def acc(v: float | None) -> str:
    """An accuracy for a table cell; "-" for a baseline that was skipped."""
    return "-" if v is None else f"{v:.3f}"


def config_command(
    app: typer.Typer,
    config: type[BaseModel],
    *,
    arguments: Iterable[str] = (),
    flags: dict[str, tuple[str, ...]] | None = None,
    envvars: dict[str, str] | None = None,
    defaults: dict[str, object] | None = None,
):
    """Register `fn(values: dict, **extra)` as a command taking `config`'s fields.

    `arguments` become positional arguments, in the order given; `flags` adds short forms
    (e.g. `{"checkpoint": ("-c",)}`); `defaults` replaces a field's default for this command
    (`...`: required). `fn`'s own keyword parameters (typer options) come after the config's, and
    `values` holds the config's fields as given, ready for `config.parse(**values)`.
    """
    arguments = list(arguments)
    flags, envvars, defaults = flags or {}, envvars or {}, defaults or {}
    fields = config.model_fields

    def decorate(fn: Callable):
        own = list(inspect.signature(fn).parameters.values())[1:]
        hints = typing.get_type_hints(fn)
        params, annotations = [], {}
        order = [*arguments, *(k for k in fields if k not in arguments)]
        for key in order:
            f = fields[key]
            default = defaults.get(key, ... if f.is_required() else f.default)
            text = (f.description or "") + _constraints(f)
            if key in arguments:
                info = typer.Argument(
                    default, help=text, metavar=key.upper(), show_default=default is not None
                )
            else:
                decls = [f"--{key.replace('_', '-')}", *flags.get(key, ())]
                if f.annotation is bool:
                    decls[0] += f"/--no-{key.replace('_', '-')}"
                info = typer.Option(
                    default,
                    *decls,
                    help=text,
                    envvar=envvars.get(key),
                    show_default=default is not None and default is not ...,
                )
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=info))
            annotations[key] = _cli_type(f.annotation)
        for p in own:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            annotations[p.name] = hints[p.name]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {k: kwargs.pop(k) for k in order}
            return fn(values, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = annotations
        app.command()(command)
        return command

    return decorate


def _cli_type(annotation) -> type:
    """The type the command line parses a field as; the config validates the value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # e.g. `Location | None`: the validator is the config's
        return _cli_type(args[0])
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = _cli_type(args[0]) if len(args) == 1 else str  # Path | str: the config decides
        return inner | None if type(None) in typing.get_args(annotation) else inner
    return annotation


def _constraints(f: FieldInfo) -> str:
    """The field's constraints and choices, said the way --help says the default."""
    said = []
    for m in f.metadata:
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                said.append(f"{sign} {getattr(m, attr)}")
    choices = _choices(f.annotation)
    if choices:
        said.append("one of " + ", ".join(choices))
    return f" [{'; '.join(said)}]" if said else ""


def _choices(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    for a in typing.get_args(annotation):
        if choices := _choices(a):
            return choices
    return []


@contextlib.contextmanager
def progress_bar(name: str, starting: str | None = None):
    """A transient rich progress bar; yields the `progress(done, total)` callback stages take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(starting or name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total, description=name)


def write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        import json

        from featx.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
