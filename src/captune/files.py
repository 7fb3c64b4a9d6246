"""Where captune keeps derived files, and how it writes a file or a folder so that a kill leaves the old one or the
new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def cache_dir() -> Path:
    """Where captune keeps derived files: $CAPTUNE_CACHE_DIR, else $XDG_CACHE_HOME/captune, else ~/.cache/captune."""
    if os.environ.get("CAPTUNE_CACHE_DIR"):
        return Path(os.environ["CAPTUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captune"


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a temporary file beside `path` (creating its folder) and renames it over `path` when the block ends.

    If the block raises, the temporary file is removed and `path` is untouched. `mode` is "w" or "wb"; other
    arguments go to `open` (e.g. `encoding`, `newline`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomically(path: Path, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to `path` through `atomic_open`."""
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as file:
            file.write(data)
    else:
        with atomic_open(path, "w", encoding="utf-8") as file:
            file.write(data)


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts a finished temporary directory in place; the previous version stays whole until the new one is there."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
