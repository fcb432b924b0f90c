"""The command line takes every option of every stage config, as the config declares it."""

from __future__ import annotations

import typing

import pytest
import typer
from typer.testing import CliRunner

from featx import cli
from featx.config import (
    DedupConfig,
    ExportConfig,
    ExtractConfig,
    IndexConfig,
    IngestConfig,
    MapConfig,
    NeighborsConfig,
    ProbeConfig,
    TrainConfig,
)
from featx.pipeline import PipelineConfig

COMMANDS = {
    "ingest": (IngestConfig, ["src", "out"]),
    "train": (TrainConfig, ["dataset"]),
    "extract": (ExtractConfig, ["dataset"]),
    "probe": (ProbeConfig, ["features"]),
    "pipeline": (PipelineConfig, ["src"]),
    "index": (IndexConfig, ["features"]),
    "neighbors": (NeighborsConfig, ["features"]),
    "dedup": (DedupConfig, ["features"]),
    "map": (MapConfig, ["features"]),
    "export": (ExportConfig, ["features"]),
}


def _value(field) -> object:
    """A valid value for the field that is not its default."""
    hint = field.annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal or any(
        typing.get_origin(a) is typing.Literal for a in args
    ):
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        choices = choices or next(typing.get_args(a) for a in args if typing.get_args(a))
        # a field with one choice (export --to lance) can only be given its default
        return next((c for c in reversed(choices) if c != field.default), field.default)
    base = args[0] if args else hint
    bounds = {k: getattr(m, k, None) for m in field.metadata for k in ("ge", "gt", "le", "lt")}
    bounds = {k: v for k, v in bounds.items() if v is not None}
    if base is bool:
        return not field.default
    if base in (int, float):
        low = bounds.get("ge", bounds.get("gt", 0))
        high = bounds.get("le", bounds.get("lt", low + 10))
        v = low + (1 if base is int else (high - low) / 2)
        return v if v != field.default else v + 1
    if field.default not in (None, ...):
        return f"{field.default}-x"
    return "value-x"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_an_option_the_cli_passes_on(command, monkeypatch):
    config, arguments = COMMANDS[command]
    expected = {k: _value(f) for k, f in config.model_fields.items()}
    argv = [command, *(str(expected[k]) for k in arguments)]
    for key, value in expected.items():
        if key in arguments:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    seen = {}

    def parse(config_cls, values):
        seen.update(values)
        raise typer.Exit(0)

    import featx.cli_use
    import flows.cli

    monkeypatch.setattr(cli, "parse", parse)
    monkeypatch.setattr(featx.cli_use, "parse", parse)
    monkeypatch.setattr(flows.cli, "parse", parse)
    r = CliRunner().invoke(cli.app, argv)
    assert r.exit_code == 0, r.output
    assert sorted(seen) == sorted(expected)
    wrong = {k: (seen[k], v) for k, v in expected.items() if str(seen[k]) != str(v)}
    assert not wrong, wrong


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_gives_every_option_its_description(command):
    config, arguments = COMMANDS[command]
    assert all(f.description for f in config.model_fields.values()), command
    r = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for key in config.model_fields:
        if key not in arguments:
            assert "--" + key.replace("_", "-") in r.output, key


def test_every_stage_config_has_a_command():
    """A new stage config gets its command here too, so the tests above cover it."""
    import featx.config

    configs = {
        c
        for c in vars(featx.config).values()
        if isinstance(c, type)
        and issubclass(c, featx.config.StageConfig)
        and c is not featx.config.StageConfig
    }
    assert configs <= {config for config, _ in COMMANDS.values()}
