"""Plan stage: read one source's raw metadata into fixed-size plan shards of candidate rows.

Streaming: a source's batches go straight into plan shards, so memory stays flat however large the
metadata is. Sources whose raw rows can repeat an image (CC3M lists some URLs twice) are first
spilled to parquet parts and merged by key, so each image is one sample holding all its captions.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.errors import PmdError
from pmd_pipeline.faults import crash_point
from pmd_pipeline.fetch.metadata import localize_metadata
from pmd_pipeline.storage import as_path, is_remote, local_scratch, remove_tree
from shards.files import atomic_path, atomic_write_json, owned_path
from shards.layout import PLAN_MARKER, REJECTS_FILE, ShardPaths, plan_folder
from sources import get_source
from sources.base import CANDIDATE_SCHEMA, RejectLog


def plan_source(cfg: BuildConfig, source_cfg: SourceConfig, on_rows=None) -> dict:
    """Write OUT/_plan/<source>/<NNNNN>.parquet and the marker; an already planned source is not re-read.

    `on_rows(n)` is told of every batch of rows read (live progress)."""
    out = as_path(cfg.out)
    folder = plan_folder(out, source_cfg.name)
    marker = folder / PLAN_MARKER
    if owned_path(out, marker).exists():
        return json.loads(marker.read_text())
    remove_tree(owned_path(out, folder))  # a partial plan from a crashed run: plans are deterministic
    source = get_source(source_cfg.name)
    source_cfg = localize_metadata(cfg, source_cfg)
    rejects = RejectLog()
    batches = _limited(source.read(source_cfg, rejects), source_cfg.limit)
    if on_rows:
        batches = _counted(batches, on_rows)
    if source.repeats_keys:
        parts = local_scratch(folder, "_parts")  # OUT/_plan/<source>/_parts, or a local folder for a bucket
        batches = _merged_by_key(batches, parts if is_remote(out) else owned_path(out, parts))
    shards, rows = _write_plan_shards(batches, out, source_cfg.name, cfg.shard_size)
    summary = _summary(source_cfg.name, shards, rows, rejects)
    rejects_file = _write_rejects(out, source_cfg.name, rejects)
    if rows == 0 and len(rejects):  # no marker: once the raw files are fixed, a re-run plans the source again
        raise PmdError(_all_rejected(source_cfg.name, summary, rejects_file))
    atomic_write_json(marker, summary, within=out)
    return summary


def _all_rejected(source: str, summary: dict, rejects_file: Path) -> str:
    """A source whose every raw record was malformed has failed: an empty build of it is not a success."""
    reasons = ", ".join(f"{reason} x{n}" for reason, n in summary["rejected_by_reason"].items())
    return (
        f"source {source}: all {summary['rejected_raw_records']} raw records were rejected as malformed "
        f"({reasons}), so nothing is left to build; see {rejects_file}"
    )


def _counted(batches: Iterator[pl.DataFrame], on_rows) -> Iterator[pl.DataFrame]:
    for batch in batches:
        on_rows(batch.height)
        yield batch


def _limited(batches: Iterator[pl.DataFrame], limit: int | None) -> Iterator[pl.DataFrame]:
    seen = 0
    for batch in batches:
        if limit is not None and seen + batch.height >= limit:
            yield batch.head(limit - seen)
            return
        seen += batch.height
        yield batch


def _merged_by_key(batches: Iterator[pl.DataFrame], parts: Path) -> Iterator[pl.DataFrame]:
    """Merge rows that share a key: captions concatenated in input order, other fields from the first row."""
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    for i, batch in enumerate(batches):
        batch.write_parquet(parts / f"part-{i:06d}.parquet")
    if not any(parts.iterdir()):
        return
    merged = merge_rows_by_key(pl.scan_parquet(parts / "*.parquet")).collect()
    shutil.rmtree(parts)
    yield merged


def merge_rows_by_key(rows: pl.LazyFrame) -> pl.LazyFrame:
    """One row per key: captions concatenated in input order, other fields from the first row."""
    firsts = [pl.col(c).first() for c in CANDIDATE_SCHEMA if c not in ("key", "captions", "caption_fields")]
    return (
        rows.group_by("key", maintain_order=True)
        .agg(
            *firsts,
            *(pl.col(c).list.explode(keep_nulls=False, empty_as_null=False) for c in ("captions", "caption_fields")),
        )
        .select(list(CANDIDATE_SCHEMA))
    )


def _write_plan_shards(batches: Iterator[pl.DataFrame], out: Path, source: str, shard_size: int) -> tuple[int, int]:
    pending: list[pl.DataFrame] = []
    buffered = shards = rows = 0
    for batch in batches:
        pending.append(batch)
        buffered += batch.height
        while buffered >= shard_size:
            chunk = pl.concat(pending)
            _write_plan_shard(ShardPaths(out, source, shards), chunk.head(shard_size))
            pending, buffered = [chunk.slice(shard_size)], buffered - shard_size
            shards, rows = shards + 1, rows + shard_size
    if buffered:
        _write_plan_shard(ShardPaths(out, source, shards), pl.concat(pending))
        shards, rows = shards + 1, rows + buffered
    return shards, rows


def _write_plan_shard(paths: ShardPaths, rows: pl.DataFrame) -> None:
    with atomic_path(paths.plan, within=paths.out) as tmp:
        rows.write_parquet(tmp)
    crash_point("plan", paths.out)


def _summary(source: str, shards: int, rows: int, rejects: RejectLog) -> dict:
    return {
        "source": source,
        "shards": shards,
        "rows": rows,
        "rejected_raw_records": len(rejects),
        "rejected_by_reason": dict(Counter(r.reason for r in rejects.rejects)),
    }


def _write_rejects(out: Path, source: str, rejects: RejectLog) -> Path:
    """Malformed raw records, kept aside with file and line: OUT/<source>/_rejects.jsonl (replaced, never followed)."""
    path = out / source / REJECTS_FILE
    with atomic_path(path, within=out) as tmp:
        rejects.write_jsonl(tmp)
    return path
