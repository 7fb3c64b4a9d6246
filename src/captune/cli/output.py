"""What the subcommands share for their results: the file an `--output` names, and metrics printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from captune.errors import CaptuneError
from captune.files import check_writable

if TYPE_CHECKING:
    from captune.metrics import EvalResult


def output_path(name: str) -> Path:
    """The file an `--output` names, its folder created; a path that cannot be a file is an error, not a traceback."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise CaptuneError(f"--output {path} is a folder; give a file name")
    check_writable(path.parent, "--output")
    return path


def print_metrics(result: EvalResult) -> None:
    for name, value in result.metrics.items():
        print(f"{name:8s} {value:.4f}")
    for name, why in result.skipped.items():
        print(f"{name:8s} skipped: {why}")
    if result.missing:
        print(f"left out {len(result.missing)} image(s) without a prediction (--allow-missing)", file=sys.stderr)
