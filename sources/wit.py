"""WIT: `wit_v1.train.all-*.tsv.gz`, 17 columns with a header (18 in the Kaggle variant), CSV quoting
with embedded newlines, streamed row by row through the csv module.

Rule: English rows only (`language == "en"`); the caption is the first that passes of (1)
caption_reference_description with at least 2 words, (2) the English segment of
caption_attribution_description (after `English:` up to the next language label) with at least 3
words, (3) caption_alt_text_description with at least 3 words; non-ASCII characters are then
stripped, and an empty result drops the row. The rule is the source's own, so no global filters run.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, meta_json, require_files, url_key
from sources.rawio import CORRUPT_STREAM, open_binary

INFO = SourceInfo(
    name="wit",
    title="WIT (Wikipedia-based Image Text)",
    raw_files="wit_v1.train.all-*.tsv.gz (TSV with header, 17 columns; Kaggle variant 18)",
    images_from="Wikimedia URLs (img2dataset)",
    rules=(
        "language en only; reference description (>=2 words) -> English segment of the attribution (>=3) "
        "-> alt text (>=3); non-ASCII stripped; one sample per image URL with all its captions"
    ),
    license="CC BY-SA 3.0 (images: their Wikimedia Commons licences)",
    paper_pairs=4.8,
    paper_avg_words=12.8,
)
COLUMNS = [
    "language", "page_url", "image_url", "page_title", "section_title", "hierarchical_section_title",
    "caption_reference_description", "caption_attribution_description", "caption_alt_text_description",
    "mime_type", "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description",
]  # fmt: skip
KAGGLE_EXTRA = "caption_title_and_reference_description"
ENGLISH_LABEL = re.compile(r"english\s*:", re.IGNORECASE)
NEXT_LABEL = re.compile(r"\s[^\s:]{2,}\s?:(?:\s|$)")  # "Français :", "Deutsch:" ... the next language label
NON_ASCII = re.compile(r"[^\x00-\x7f]+")
CAPTION_FIELDS = (  # (column, minimum words), in priority order
    ("caption_reference_description", 2),
    ("caption_attribution_description", 3),
    ("caption_alt_text_description", 3),
)

csv.field_size_limit(min(sys.maxsize, 1 << 24))  # context descriptions can be long; 16 MB is corrupt


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 20_000) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        batch = []
        for line_no, record in _records(path, cfg.name, rejects):
            batch.append(_candidate(record, path.name, line_no))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)


def _records(path: Path, source: str, rejects: RejectLog) -> Iterator[tuple[int, dict]]:
    with open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter="\t", quotechar='"')
        try:
            header = _header(next(reader, None), path, source)
        except CORRUPT_STREAM as err:
            raise PmdError(f"source {source}: {path} is not a readable gzip/TSV file ({type(err).__name__})") from None
        while True:
            line_no = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                rejects.add(path, line_no, "csv_error", str(err))
                continue
            except CORRUPT_STREAM as err:  # the rest of a damaged .gz cannot be read
                rejects.add(path, line_no, "corrupt_compressed_stream", f"{type(err).__name__}: {err}")
                return
            if fields == [] or fields == [""]:
                continue
            if len(fields) != len(header):
                rejects.add(path, line_no, "wrong_column_count", "\t".join(fields))
                continue
            if any("\ufffd" in f for f in fields):
                rejects.add(path, line_no, "invalid_utf8", "\t".join(fields))
                continue
            yield line_no, dict(zip(header, fields, strict=True))


def _header(fields: list[str] | None, path: Path, source: str) -> list[str]:
    if fields == COLUMNS or fields == [*COLUMNS, KAGGLE_EXTRA]:
        return fields
    raise PmdError(
        f"source {source}: {path} does not start with the WIT header ({len(COLUMNS)} columns: "
        f"{', '.join(COLUMNS[:3])}, ...; or the Kaggle variant with {KAGGLE_EXTRA})"
    )


def english_attribution(text: str) -> str:
    """The text after `English:` up to the next language label, or "" without an English label."""
    match = ENGLISH_LABEL.search(text)
    if not match:
        return ""
    rest = text[match.end() :]
    following = NEXT_LABEL.search(rest)
    return (rest[: following.start()] if following else rest).strip()


def choose_caption(record: dict) -> tuple[str | None, str | None, str | None]:
    """(caption, field, drop reason) by WIT's fallback rule."""
    if record["language"] != "en":
        return None, None, "not_english"
    for column, minimum in CAPTION_FIELDS:
        text = record[column]
        if column == "caption_attribution_description":
            text = english_attribution(text)
        if len(text.split()) >= minimum:
            ascii_text = " ".join(NON_ASCII.sub("", text).split())
            if not ascii_text:
                return None, None, "empty_after_ascii_strip"
            return ascii_text, column, None
    return None, None, "no_caption_passes"


def _candidate(record: dict, file_name: str, line_no: int) -> dict:
    caption, field, reason = choose_caption(record)
    return {
        "key": url_key("wit", record["image_url"]),
        "source": INFO.name,
        "image_url": record["image_url"],
        "captions": [caption] if caption else [],
        "caption_fields": [field] if field else [],
        "caption_mode": "all",
        "license": INFO.license,
        "meta": meta_json({"file": file_name, "line": line_no, **{k: record[k] for k in COLUMNS[:9]}}),
        "drop_reason": reason,
    }


SOURCE = Source(info=INFO, read=read, repeats_keys=True, default_filters=())
