"""Streaming reader for headerless TSV metadata: one record per line, malformed lines go to the reject log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl

from sources.base import RejectLog, candidates_frame
from sources.rawio import numbered_lines

MAX_LINE_BYTES = 1 << 20  # a metadata line longer than 1 MiB is corrupt, not a caption


def read_tsv_lines(path: Path, expected_fields: int, rejects: RejectLog) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for every well-formed line; reject the rest with a reason."""
    for line_no, raw in numbered_lines(path, rejects):
        fields = _parse_line(raw, expected_fields)
        if isinstance(fields, str):
            rejects.add(path, line_no, fields, raw[:2000])
        elif fields is not None:
            yield line_no, fields


def _parse_line(raw: bytes, expected_fields: int) -> list[str] | str | None:
    """The fields, a reject reason, or None for a blank line."""
    if len(raw) > MAX_LINE_BYTES:
        return "line_too_long"
    if b"\x00" in raw:
        return "nul_byte"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    text = text.rstrip("\r\n")
    if not text.strip():
        return None
    fields = text.split("\t")
    if len(fields) != expected_fields:
        return "wrong_column_count"
    return fields


def read_tsv_batches(
    paths: list[Path],
    expected_fields: int,
    rejects: RejectLog,
    make_row: Callable[[list[str], Path, int], dict],
    batch_rows: int = 50_000,
) -> Iterator[pl.DataFrame]:
    """Candidate batches from headerless TSV files: `make_row(fields, path, line_no)` per good line."""
    for path in paths:
        batch = []
        for line_no, fields in read_tsv_lines(path, expected_fields, rejects):
            batch.append(make_row(fields, path, line_no))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)
