"""Streaming reader for headerless TSV metadata: one record per line, malformed lines go to the reject log."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import polars as pl

from sources.base import RejectLog, candidates_frame
from sources.rawio import numbered_lines

MAX_LINE_BYTES = 1 << 20  # a metadata line longer than 1 MiB is corrupt, not a caption
PROBE_LINES = 1000  # lines read to tell which of a source's known column layouts a file has


def read_tsv_lines(path: Path, expected_fields: int, rejects: RejectLog) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for every well-formed line; reject the rest with a reason."""
    for line_no, raw in numbered_lines(path, rejects):
        text, reason = check_line(raw, expected_fields)
        if reason:
            rejects.add(path, line_no, reason, raw[:2000])
        elif text is not None:
            yield line_no, text.split("\t")


def check_line(raw: bytes, expected_fields: int) -> tuple[str | None, str | None]:
    """(the decoded line, None), (None, a reject reason), or (None, None) for a blank line."""
    if len(raw) > MAX_LINE_BYTES:
        return None, "line_too_long"
    if b"\x00" in raw:
        return None, "nul_byte"
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if not text.strip():
        return None, None
    if text.count("\t") != expected_fields - 1:
        return None, "wrong_column_count"
    return text, None


def file_layout(path: Path, layouts: tuple[int, ...]) -> int:
    """Which known column count a file has: the most common one in its first lines (ties: the first listed).

    Decided per file, not per line: a stray tab in one caption of a 2-column file stays a reject.
    """
    widths = Counter(raw.count(b"\t") + 1 for _, raw in islice(numbered_lines(path, RejectLog()), PROBE_LINES))
    return max(layouts, key=lambda width: (widths[width], -layouts.index(width)))


def read_tsv_batches(
    paths: list[Path],
    layouts: int | tuple[int, ...],
    rejects: RejectLog,
    make_row: Callable[[list[str], Path, int], dict],
    batch_rows: int = 50_000,
) -> Iterator[pl.DataFrame]:
    """Candidate batches from headerless TSV files: `make_row(fields, path, line_no)` per good line.

    `layouts`: the column count, or the known counts (the canonical first); each file is read in its own.
    """
    layouts = (layouts,) if isinstance(layouts, int) else layouts
    for path in paths:
        batch = []
        width = layouts[0] if len(layouts) == 1 else file_layout(path, layouts)
        for line_no, fields in read_tsv_lines(path, width, rejects):
            batch.append(make_row(fields, path, line_no))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)
