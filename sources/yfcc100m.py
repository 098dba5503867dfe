"""YFCC100M: the 25-column headerless TSV `yfcc100m_dataset`, streamed in chunks and cleaned column-wise.

Rule (FLAVA; the public port): photos only (marker 0); title and description are URL-decoded
(`unquote_plus`), HTML tags removed (nothing in their place), whitespace collapsed; the description is
the caption if it passes the filters, else the title (caption_mode first_passing). The filters are the
source's own default chain: more than two words, not a date/time only, no odd characters, English
(langdetect). PMD text-filters no other source (pmd_pipeline/config.py non_empty_filters).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import polars as pl

from pmd_pipeline.config import FilterConfig, SourceConfig
from sources.base import CANDIDATE_SCHEMA, RejectLog, Source, SourceInfo, make_key, require_files
from sources.rawio import CORRUPT_STREAM, open_binary
from sources.tsv import check_line

INFO = SourceInfo(
    name="yfcc100m",
    title="YFCC100M subset",
    raw_files="yfcc100m_dataset (headerless 25-column TSV, URL-encoded text)",
    images_from="Flickr URLs (img2dataset)",
    rules=(
        "photos only; unquote_plus, remove HTML tags (nothing in their place), collapse whitespace; "
        "description if it passes the filters, "
        "else title; filters: >2 words, not date/time only, no odd characters, English (langdetect, seeded)"
    ),
    license="each photo's Creative Commons licence (in the row); Yahoo Webscope terms",
    paper_pairs=30.3,
    paper_avg_words=12.7,
)

COLUMNS = [
    "line_number", "photo_id", "hash", "user_nsid", "nickname", "date_taken", "date_uploaded", "device",
    "title", "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
    "download_url", "license_name", "license_url", "server", "farm", "secret", "secret_original",
    "extension", "marker",
]  # fmt: skip
META_COLUMNS = ["line_number", "photo_id", "user_nsid", "date_taken", "page_url", "license_url", "title", "description"]
DEFAULT_FILTERS = (
    FilterConfig("caption_length", {"min_words": 3}),
    FilterConfig("no_datetime_only"),
    FilterConfig("odd_characters"),
    FilterConfig("english"),
)
CHUNK_BYTES = 32 << 20


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        for first_line, lines in _line_chunks(path, rejects):
            good, numbers = _well_formed(path, first_line, lines, rejects)
            if good:
                yield candidates(pl.Series("line", good, dtype=pl.Utf8), pl.Series("file_line", numbers))


def _line_chunks(path: Path, rejects: RejectLog) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the chunk's first line, its raw lines), about CHUNK_BYTES at a time."""
    line_no = 1
    try:
        with open_binary(path) as f:
            while lines := f.readlines(CHUNK_BYTES):
                yield line_no, lines
                line_no += len(lines)
    except CORRUPT_STREAM as err:
        rejects.add(path, line_no, "corrupt_compressed_stream", f"{type(err).__name__}: {err}")


def _well_formed(path: Path, first_line: int, lines: list[bytes], rejects: RejectLog) -> tuple[list[str], list[int]]:
    """The chunk's decoded 25-column lines and their numbers; the others are rejects (the TSV rules)."""
    good, numbers = [], []
    for line_no, raw in enumerate(lines, start=first_line):
        text, reason = check_line(raw, len(COLUMNS))
        if reason:
            rejects.add(path, line_no, reason, raw[:2000])
        elif text is not None:
            good.append(text)
            numbers.append(line_no)
    return good, numbers


def yfcc_key(photo_id: str) -> str:
    return make_key("yfcc", photo_id)


# An HTML tag: "<" (or "</") right before a letter, up to the next ">". Text such as "Vimioso<->Miranda",
# "I <3 NY" or "a < b" has no tag name there and stays. Entities (&amp;) are text: the rule does not decode
# them, so an entity-encoded tag (&lt;b&gt;) is never taken for a tag.
HTML_TAG = r"</?[A-Za-z][^>]*>"


def clean_text(encoded: pl.Series) -> pl.Series:
    """URL-decode (`+` is a space, `%0A` a newline), strip HTML tags, collapse whitespace.

    A tag is removed with nothing in its place, as the published cleaning does: `<a href=..>Hyro</a>'s
    office` is "Hyro's office" and `<i>Trekking Asia</i>.` is "Trekking Asia.", never "Hyro 's" or
    "Asia ."; a tag inside a word (`wa<b>t</b>er`) leaves the word whole."""
    decoded = pl.Series([unquote_plus(t) if t else "" for t in encoded], dtype=pl.Utf8)
    return decoded.str.replace_all(HTML_TAG, "").str.replace_all(r"\s+", " ").str.strip_chars()


def candidates(lines: pl.Series, file_lines: pl.Series) -> pl.DataFrame:
    """Candidate rows of one chunk of well-formed lines, built column-wise."""
    raw = lines.str.split_exact("\t", len(COLUMNS) - 1).struct.rename_fields(COLUMNS).struct.unnest()
    title, description = clean_text(raw["title"]), clean_text(raw["description"])
    frame = raw.with_columns(title=title, description=description, file_line=file_lines)
    return frame.select(
        key=pl.col("photo_id").map_elements(yfcc_key, return_dtype=pl.Utf8),  # the one key rule (sources/base.py)
        source=pl.lit(INFO.name),
        image_url=pl.col("download_url"),
        image_path=pl.lit(None, dtype=pl.Utf8),
        crop_box=pl.lit(None, dtype=pl.List(pl.Int64)),
        captions=pl.concat_list("description", "title"),
        caption_fields=pl.lit(["description", "title"], dtype=pl.List(pl.Utf8)),
        caption_mode=pl.lit("first_passing"),
        license=pl.col("license_name").str.replace_all(r"\+", " "),
        meta=pl.struct(*META_COLUMNS, "file_line").struct.json_encode(),
        label=pl.lit(None, dtype=pl.Utf8),
        cls=pl.lit(None, dtype=pl.Int64),
        drop_reason=pl.when(pl.col("marker") != "0").then(pl.lit("not_a_photo")).otherwise(None),
    ).cast(CANDIDATE_SCHEMA)


SOURCE = Source(info=INFO, read=read, repeats_keys=False, default_filters=DEFAULT_FILTERS)
