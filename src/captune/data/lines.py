"""The line-based annotation files (token and split files, CSV, JSON lines): one record a line, numbered from 1.

A CSV record is one line here, unlike in the csv module, where a quote opens a field that runs on until the next
quote: one unclosed quote there turns the rest of the file into one caption. A caption never needs a line break, so
a quoted field that runs over a line end is a problem of its line (and of the line where it closes), and every other
line is still read as a record of its own.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from captune.data import read_text
from captune.errors import CaptuneError

OPEN_QUOTE = (
    "a quoted field is not closed on this line (the line has an odd number of double quotes); a record is one line: "
    'close the quote, or write a quote inside a caption as "" in a quoted caption'
)


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of an annotation file's text (as `read_text` gives it) with their numbers, from 1."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


@dataclass(frozen=True)
class CsvLine:
    """One non-blank line after a CSV file's header."""

    line: int
    fields: list[str]
    """Its fields, read leniently when it is not a record (for naming the image in a problem)."""
    error: str | None = None
    """Why it is not a record of the table: an unclosed quote, text after a closing quote, or a number of fields
    other than the header's."""


def csv_table(path: Path) -> tuple[list[str], Iterator[CsvLine]]:
    """The header (stripped cells; [] for an empty file) and the lines after it of a CSV file.

    Raises:
        CaptuneError: The file is not UTF-8, or its header is not one CSV record.
    """
    lines = numbered_lines(read_text(path))
    first = next(lines, None)
    if first is None:
        return [], iter(())
    header, error = _record(first[1])
    if error is not None:
        raise CaptuneError(f"{path}:{first[0]}: the header is not readable as CSV: {error}")
    return [cell.strip() for cell in header], _rows(lines, len(header), ",".join(cell.strip() for cell in header))


def _rows(lines: Iterator[tuple[int, str]], width: int, header: str) -> Iterator[CsvLine]:
    for number, text in lines:
        fields, error = _record(text)
        if error is None and len(fields) != width:
            fix = "quote captions that hold commas" if len(fields) > width else "give every column of the header"
            error = f"expected {width} fields ({header}), found {len(fields)}; {fix}"
        yield CsvLine(number, fields, error)


def _record(text: str) -> tuple[list[str], str | None]:
    """The fields of one line and why it is not one CSV record (None if it is)."""
    if text.count('"') % 2:
        return next(csv.reader([text])), OPEN_QUOTE
    try:
        return next(csv.reader([text], strict=True)), None
    except csv.Error as exc:
        fix = 'quote the whole field and write each quote inside it as ""'
        return next(csv.reader([text])), f"not one CSV record ({exc}); {fix}"
