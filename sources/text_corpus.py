"""Unimodal text: plain-text or jsonl corpora (CCNews, BookCorpus, Wikipedia dumps, ...) split into
passages of at most `max_words` words (about the text encoder's context), for masked language modeling.

Plain text: paragraphs are separated by blank lines and packed into passages. jsonl: one document per
line in the field `text_field` (default "text"). Text-only samples: KEY.txt and KEY.json, no image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import AtLeastOne, SourceConfig, Text
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.rawio import numbered_lines
from sources.tsv import MAX_LINE_BYTES

INFO = SourceInfo(
    name="text_corpus",
    title="Text corpus (unimodal)",
    raw_files="*.txt (paragraphs) or *.jsonl (one document per line, field `text`)",
    images_from="none (text-only samples)",
    rules="split into passages of at most max_words (default 300) words",
    license="the corpus's own",
    paper_pairs=0,
    paper_avg_words=0,
)


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 20_000) -> Iterator[pl.DataFrame]:
    max_words = int(cfg.options.get("max_words", 300))
    field = cfg.options.get("text_field", "text")
    for path in require_files(cfg):
        documents = _jsonl_documents(path, field, rejects) if ".jsonl" in path.name else _paragraphs(path, rejects)
        batch = []
        for line_no, text in documents:
            for i, passage in enumerate(passages(text, max_words)):
                batch.append(_row(path, line_no, i, passage))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)


def passages(text: str, max_words: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]


def _lines(path: Path, rejects: RejectLog) -> Iterator[tuple[int, str]]:
    for line_no, raw in numbered_lines(path, rejects):
        if len(raw) > MAX_LINE_BYTES * 16:
            rejects.add(path, line_no, "line_too_long", raw[:2000])
            continue
        if b"\x00" in raw:
            rejects.add(path, line_no, "nul_byte", raw[:2000])
            continue
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError:
            rejects.add(path, line_no, "invalid_utf8", raw[:2000])


def _paragraphs(path: Path, rejects: RejectLog) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph text): blank lines separate paragraphs."""
    start, lines = None, []
    for line_no, line in _lines(path, rejects):
        if line.strip():
            start = start or line_no
            lines.append(line.strip())
        elif lines:
            yield start, " ".join(lines)
            start, lines = None, []
    if lines:
        yield start, " ".join(lines)


def _jsonl_documents(path: Path, field: str, rejects: RejectLog) -> Iterator[tuple[int, str]]:
    for line_no, line in _lines(path, rejects):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            rejects.add(path, line_no, "json_error", line)
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
            rejects.add(path, line_no, "missing_field", line)
            continue
        yield line_no, doc[field]


def _row(path: Path, line_no: int, index: int, passage: str) -> dict:
    return {
        "key": make_key("text", f"{path.stem}_{line_no}_{index}"),
        "source": INFO.name,
        "captions": [passage],
        "caption_fields": ["passage"],
        "caption_mode": "all",
        "license": INFO.license,
        "meta": meta_json({"file": path.name, "line": line_no, "passage": index}),
    }


SOURCE = Source(info=INFO, read=read, options={"max_words": AtLeastOne, "text_field": Text})
