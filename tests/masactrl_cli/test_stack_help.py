"""`masactrl up`, `down` and `demo`: every option with a default names the variable behind it,
and `demo` takes `--port`."""

from __future__ import annotations

import re

import pytest

from masactrl_cli.main import build_parser


def help_text(command: str) -> str:
    parser = build_parser([command])
    subparsers = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001
    return re.sub(r"\s+", " ", subparsers.choices[command].format_help())


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (
            "up",
            [
                "MASACTRL_STACK_DIR or ./var",
                "MASACTRL_STACK_PORT or 8000",
                "MASACTRL_STACK_REDIS_PORT or 6380",
                "MASACTRL_STACK_START_TIMEOUT_SECONDS or 900",
            ],
        ),
        ("down", ["MASACTRL_STACK_DIR or ./var", "MASACTRL_STACK_STOP_TIMEOUT_SECONDS or 15"]),
        ("demo", ["MASACTRL_STACK_PORT or 8000"]),
    ],
)
def test_defaults_name_their_environment_variables(command: str, variables: list[str]) -> None:
    text = help_text(command)
    for variable in variables:
        assert variable in text, (command, variable, text)


def test_demo_takes_a_port() -> None:
    args = build_parser(["demo"]).parse_args(["demo", "--port", "8123"])
    assert args.port == 8123
