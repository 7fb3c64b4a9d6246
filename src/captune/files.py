"""Where captune keeps derived files, how it writes a file or a folder so that a kill leaves the old one or the
new one, and its progress bars."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from captune.errors import CaptuneError


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode `open` would give it
        with os.fdopen(fd, mode, **kwargs) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(folder: Path, what: str) -> None:
    """Creates `folder` if needed and writes (and removes) a file there, so that a folder that cannot be written
    fails before any work, in one line.

    Raises:
        CaptuneError: naming `what` (e.g. `train.output_dir`), the folder and the system's reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CaptuneError(f"{what} {folder}: cannot write there ({err.strerror or err}); choose a folder you can "
                           "write to, or make this one writable") from None  # fmt: skip


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_utf8(path: Path) -> str:
    """A text file's contents: UTF-8, an optional BOM removed, newlines as `\\n`.

    Raises:
        CaptuneError: the file is not UTF-8 text; the message names its line and column.
    """
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        where = f"line {line}, column {column}"
        raise CaptuneError(f"{path}: not UTF-8 text ({err.reason} at {where}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to `path` through `atomic_open`."""
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as file:
            file.write(data)
    else:
        with atomic_open(path, "w", encoding="utf-8") as file:
            file.write(data)


def write_json(path: Path, value: Any) -> None:
    """Writes `value` as indented JSON through `write_atomically`."""
    write_atomically(path, json.dumps(value, indent=2))


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts a finished temporary directory in place; the previous version stays whole until the new one is there."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar on stderr, in images: redrawn twice a second on a terminal, a line every 30 s in a log file."""
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, file=sys.stderr, mininterval=interval)
