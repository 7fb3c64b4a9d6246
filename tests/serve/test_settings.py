"""The server's settings: `captune serve` refuses the ones no server can run with, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from captune.cli import main


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--header-timeout-s", "nan"], "--header-timeout-s must be a number of seconds > 0"),
        (["--body-timeout-s", "0"], "--body-timeout-s must be a number of seconds > 0"),
        (["--idle-timeout-s", "inf"], "--idle-timeout-s must be a number of seconds > 0"),
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", "8", "--max-connections-per-client", "9"], "--max-connections-per-client must be from"),
    ],
)
def test_invalid_server_settings_are_refused_by_the_command(
    model_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert main(["serve", "--model-dir", str(model_dir), *flags]) == 2
    assert f"error: invalid server settings: {named}" in capsys.readouterr().err
