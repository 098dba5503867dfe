"""Write one shard: the webdataset tar of its samples and the parquet of every input row with its status.

The fetch stage hands it one `Fetched` record per sample key; the stats it returns are written last by the
caller (the completion marker).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pmd_pipeline.faults import crash_point
from shards.files import atomic_path
from shards.layout import CLASS_EXT, IMAGE_EXT, JSON_EXT, TEXT_EXT, TOKENS_EXT, ShardPaths, check_safe_name
from shards.schema import NO_CLASS, json_problems
from shards.tar import write_tar

WRITTEN, DROPPED, FAILED = "written", "dropped", "failed"


@dataclass
class Fetched:
    """The outcome for one sample: image bytes ready for the shard, or a reason code and the raw error."""

    jpg: bytes | None = None
    reason: str | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None


def write_shard(
    paths: ShardPaths, rows: pl.DataFrame, fetched: dict[str, Fetched], tokens: dict[str, bytes] | None = None
) -> dict:
    """Write tar then parquet (each atomically) and return the shard's stats (the caller writes them last).

    `rows` are the shard's filtered plan rows: `reason` null means the row was meant to become a sample;
    `fetched` holds the image outcome of every such row that has an image; `tokens` the KEY.dvae.npy bytes
    of the images that have them (a streaming build writes each tar once, tokens included).
    """
    outcomes = [_outcome(row, fetched) for row in rows.iter_rows(named=True)]
    tar_bytes, tar_sha256 = _write_tar(paths, rows, outcomes, tokens or {})
    table = _status_table(rows, outcomes)
    _write_parquet_atomic(table, paths.parquet, paths.out)
    return shard_stats(paths, table, tar_bytes, tar_sha256)


def _outcome(row: dict, fetched: dict[str, Fetched]) -> tuple[str, str | None, Fetched | None]:
    """(status, reason, fetched) for one plan row."""
    if row["reason"] is not None:
        return DROPPED, row["reason"], None
    if row["image_url"] is None and row["image_path"] is None:
        return WRITTEN, None, None  # a text-only sample
    result = fetched.get(row["key"]) or Fetched(reason="not_fetched", error="no fetch outcome was recorded")
    if result.jpg is None:
        return FAILED, result.reason, result
    return WRITTEN, None, result


def _write_tar(paths: ShardPaths, rows: pl.DataFrame, outcomes, tokens: dict[str, bytes]) -> tuple[int, str]:
    """Samples in plan order, so the same inputs give the same bytes."""
    samples = (
        _sample(row, result, tokens.get(row["key"]))
        for row, (status, _, result) in zip(rows.iter_rows(named=True), outcomes, strict=True)
        if status == WRITTEN
    )
    return write_tar(paths.tar, samples, before_rename=lambda: crash_point("write_tar", paths.out), within=paths.out)


def _sample(row: dict, result: Fetched | None, tokens: bytes | None) -> dict:
    key = check_safe_name(row["key"], "sample key")
    sample = {"__key__": key}
    captions = row["kept_captions"] or []
    if result is None:  # text-only (a text corpus passage): KEY.txt and KEY.json, no image
        sample[TEXT_EXT] = captions[0].encode("utf-8")
        sample[JSON_EXT] = _json_bytes(_sample_json(row, Fetched()))
        return sample
    sample[IMAGE_EXT] = result.jpg
    if tokens is not None:
        sample[TOKENS_EXT] = tokens
    if captions:
        sample[TEXT_EXT] = captions[0].encode("utf-8")
    if row["cls"] is not None:
        sample[CLASS_EXT] = str(row["cls"]).encode("ascii")
    sample[JSON_EXT] = _json_bytes(_sample_json(row, result))
    return sample


def _sample_json(row: dict, result: Fetched) -> dict:
    """KEY.json in the one schema of shards/schema.py: every key in every source, absent values typed empty."""
    original = [result.original_width or 0, result.original_height or 0]
    doc = {
        "key": row["key"],
        "source": row["source"],
        "captions": row["kept_captions"] or [],
        "caption_fields": row["kept_fields"] or [],
        "url": row["image_url"] or "",
        "image_path": _portable(row["image_path"]),
        "crop_box": list(row["crop_box"]) if row["crop_box"] is not None else [0, 0, *original],
        "license": row["license"] or "",
        "original_width": original[0],
        "original_height": original[1],
        "width": result.width or 0,
        "height": result.height or 0,
        "label": row["label"] or "",
        "cls": NO_CLASS if row["cls"] is None else row["cls"],
        "meta": row["meta"] or "{}",  # already JSON: sources encode their raw record with meta_json
    }
    problems = json_problems(doc)
    assert not problems, f"{row['key']}: KEY.json breaks the schema: {problems}"
    return doc


def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _portable(image_path: str | None) -> str:
    """The archive's file name and the member: provenance that does not change with where files live."""
    if image_path is None:
        return ""
    archive, sep, member = image_path.partition("::")
    return f"{Path(archive).name}{sep}{member}"


def _status_table(rows: pl.DataFrame, outcomes) -> pl.DataFrame:
    def column(getter, dtype):
        return pl.Series([getter(o) for o in outcomes], dtype=dtype)

    return rows.drop("reason").with_columns(
        status=column(lambda o: o[0], pl.Utf8),
        reason=column(lambda o: o[1], pl.Utf8),
        error=column(lambda o: o[2].error if o[2] else None, pl.Utf8),
        width=column(lambda o: o[2].width if o[2] else None, pl.Int32),
        height=column(lambda o: o[2].height if o[2] else None, pl.Int32),
        original_width=column(lambda o: o[2].original_width if o[2] else None, pl.Int32),
        original_height=column(lambda o: o[2].original_height if o[2] else None, pl.Int32),
        image_bytes=column(lambda o: len(o[2].jpg) if o[2] and o[2].jpg else None, pl.Int64),
    )


def _write_parquet_atomic(table: pl.DataFrame, path: Path, out: Path) -> None:
    with atomic_path(path, within=out) as tmp:
        table.write_parquet(tmp)


def shard_stats(paths: ShardPaths, table: pl.DataFrame, tar_bytes: int, tar_sha256: str) -> dict:
    """Counts for `pmd stats` and the manifest; rows_in = samples_written + dropped + failed, always."""
    written = table.filter(pl.col("status") == WRITTEN)
    stats = {
        "source": paths.source,
        "shard": paths.name,
        "rows_in": table.height,
        "samples_written": written.height,
        "pairs_written": int(written["kept_captions"].list.len().sum() or 0),
        "caption_words": int(
            written["kept_captions"].list.eval(pl.element().str.count_matches(r"\S+")).list.sum().sum() or 0
        ),
        "rows_dropped": _count(table, DROPPED),
        "rows_failed": _count(table, FAILED),
        "captions_in": int(table["captions"].list.len().sum() or 0),
        "captions_dropped": dict(Counter(r for rs in table["caption_reasons"].drop_nulls() for r in rs if r)),
        "fetch_attempted": int(table.filter(pl.col("status") != DROPPED).height),
        "image_bytes": int(written["image_bytes"].sum() or 0),
        "tar_bytes": tar_bytes,
        "tar_sha256": tar_sha256,
    }
    accounted = stats["samples_written"] + sum(stats["rows_dropped"].values()) + sum(stats["rows_failed"].values())
    assert accounted == stats["rows_in"], f"shard {paths.tar}: {accounted} rows accounted of {stats['rows_in']}"
    return stats


def _count(table: pl.DataFrame, status: str) -> dict[str, int]:
    counts = table.filter(pl.col("status") == status)["reason"].value_counts()
    return {r: int(n) for r, n in counts.iter_rows()}
