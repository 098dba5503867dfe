"""Build statistics from the per-shard stats, dVAE sidecar and parquet files (never the tars): per source and in total.

Counts are exact sums of the shards' `_stats.json`. Distributions (median caption words, image size
percentiles) need the rows, so they come from the parquet files of an evenly spaced subset of each
source's shards (`sample_shards`, 0 = all): 10,000 shards take about 1.4 s of CPU (docs/bench_stats.md).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from pmd_pipeline.errors import PmdError
from pmd_pipeline.storage import as_path, is_remote
from shards.layout import (
    CODEBOOK_SIZE,
    CONFIG_FILE,
    MANIFEST_FILE,
    PARQUET_SUFFIX,
    PLAN_FOLDER,
    PLAN_MARKER,
    STATS_SUFFIX,
    plan_folder,
)
from shards.sidecar import files_ending, read_sidecars

SUMMED = (
    "rows_in",
    "samples_written",
    "pairs_written",
    "caption_words",
    "captions_in",
    "fetch_attempted",
    "image_bytes",
    "tar_bytes",
)
REASON_COUNTS = ("rows_dropped", "rows_failed", "captions_dropped", "rejected_by_reason")
DEFAULT_SAMPLE_SHARDS = 64
PERCENTILES = (10, 50, 90)
TOP_CODES = 10


def collect_stats(
    out: Path, source: str | None = None, sample_shards: int = DEFAULT_SAMPLE_SHARDS, codes: bool = True
) -> dict:
    """{'sources': {name: summary}, 'total': summary} for a build folder; `codes` adds codebook usage."""
    names = source_names(out, source)
    sources = {name: _source_summary(out, name, sample_shards, codes) for name in names}
    total = _merge(list(sources.values()))
    total["tokens"] = _merge_tokens([s["tokens"] for s in sources.values()])
    total["distribution"] = None  # percentiles do not add up across sources
    return {"out": str(out), "sources": sources, "total": total, "manifest_tokens": _manifest_tokens(out)}


def _manifest_tokens(out: Path) -> dict | None:
    """The manifest's top-level "tokens" entry (codebook, random, note) once the tokenize stage has run."""
    path = out / MANIFEST_FILE
    return json.loads(path.read_bytes()).get("tokens") if path.exists() else None


def source_names(out: Path, source: str | None = None) -> list[str]:
    """The sources a build planned (all, or the one asked for, with a clear error when it is not there)."""
    if not (out / CONFIG_FILE).exists():
        raise PmdError(f"{out} is not a pmd build output (no config.json)")
    names = sorted(p.parent.name for p in out.glob(f"{PLAN_FOLDER}/*/{PLAN_MARKER}"))
    if source is None:
        return names
    if source not in names:
        raise PmdError(f"no source {source!r} in {out}; it has: {', '.join(names) or 'none'}")
    return [source]


def shard_stats_files(out: Path, source: str) -> list[str]:
    """Finished shards of a source (their stats file is the completion marker), in shard order."""
    return files_ending(out / source, STATS_SUFFIX)


def _load_stats(path: str) -> dict:
    try:
        return json.loads(as_path(path).read_bytes())
    except ValueError as err:
        raise PmdError(
            f"{path}: unreadable shard stats ({err}); delete it and re-run `pmd build` to redo the shard"
        ) from None


def _source_summary(out: Path, name: str, sample_shards: int, codes: bool) -> dict:
    plan = json.loads((plan_folder(out, name) / PLAN_MARKER).read_text())
    shards = [_load_stats(p) for p in shard_stats_files(out, name)]
    finished = {s["shard"] for s in shards}  # a sidecar counts only beside a finished shard
    sidecars = {k: v for k, v in read_sidecars(out / name, with_codes=codes).items() if k in finished}
    for shard in shards:  # a tokenized shard's tar was rewritten: its size is the sidecar's
        if shard["shard"] in sidecars:
            shard["tar_bytes"] = sidecars[shard["shard"]]["tar_bytes"]
    summary = _merge(shards)
    summary["shards_planned"] = plan["shards"]
    summary["rejected_raw_records"] = plan["rejected_raw_records"]
    summary["rejected_by_reason"] = plan["rejected_by_reason"]
    summary["tokens"] = _tokens(list(sidecars.values()), _images_written(shards, sidecars))
    summary["distribution"] = _distribution(*written_rows(out, name, sample_shards))
    return _derived(summary)


def _merge(parts: list[dict]) -> dict:
    merged = {key: sum(p.get(key, 0) for p in parts) for key in SUMMED}
    merged["shards"] = sum(p.get("shards", 1) for p in parts)
    merged["shards_planned"] = sum(p.get("shards_planned", 0) for p in parts)
    merged["rejected_raw_records"] = sum(p.get("rejected_raw_records", 0) for p in parts)
    for key in REASON_COUNTS:
        counts = Counter()
        for p in parts:
            counts.update(p.get(key, {}))
        merged[key] = dict(counts.most_common())
    return _derived(merged)


def _derived(s: dict) -> dict:
    failed = sum(s["rows_failed"].values())
    s["fetch_success_rate"] = round(1 - failed / s["fetch_attempted"], 4) if s["fetch_attempted"] else None
    s["mean_caption_words"] = round(s["caption_words"] / s["pairs_written"], 2) if s["pairs_written"] else None
    return s


# --- dVAE token sidecars -------------------------------------------------------------------------


def code_counts(sidecars: list[dict]) -> np.ndarray | None:
    """How often each of the 8192 codebook entries occurs, summed over shards (None when not read)."""
    if any(s["code_counts"] is None for s in sidecars):
        return None
    total = np.zeros(CODEBOOK_SIZE, dtype=np.int64)
    for sidecar in sidecars:
        total += np.asarray(sidecar["code_counts"], dtype=np.int64)
    return total


def _images_written(shards: list[dict], sidecars: dict[str, dict]) -> int:
    """Samples that carry an image, which the tokenize stage turns into tokens.

    A tokenized shard's sidecar counts them (tokenized + failed). An untokenized shard's are all its samples
    when it stored image bytes: a source's samples all have an image (images, pairs) or none do (text)."""
    images = 0
    for shard in shards:
        sidecar = sidecars.get(shard["shard"])
        if sidecar is not None:
            images += sidecar["samples_tokenized"] + sidecar["samples_failed"]
        elif shard.get("image_bytes", 0) > 0:
            images += shard["samples_written"]
    return images


def _tokens(sidecars: list[dict], images: int) -> dict:
    failures = Counter()
    for s in sidecars:
        failures.update(s["failure_reasons"])
    return _token_summary(
        code_counts(sidecars),
        images,
        shards_tokenized=len(sidecars),
        samples_tokenized=sum(s["samples_tokenized"] for s in sidecars),
        samples_failed=sum(s["samples_failed"] for s in sidecars),
        failure_reasons=failures,
        codebooks={s["codebook"] for s in sidecars},
        codebook_random=any(s["codebook_random"] for s in sidecars),
    )


def _merge_tokens(parts: list[dict]) -> dict:
    failures = Counter()
    for p in parts:
        failures.update(p["failure_reasons"])
    counts = [p["code_counts"] for p in parts]
    return _token_summary(
        None if any(c is None for c in counts) else sum(counts, np.zeros(CODEBOOK_SIZE, dtype=np.int64)),
        sum(p["samples_with_image"] for p in parts),
        shards_tokenized=sum(p["shards_tokenized"] for p in parts),
        samples_tokenized=sum(p["samples_tokenized"] for p in parts),
        samples_failed=sum(p["samples_failed"] for p in parts),
        failure_reasons=failures,
        codebooks={c for p in parts for c in p["codebooks"]},
        codebook_random=any(p["codebook_random"] for p in parts),
    )


def _token_summary(counts: np.ndarray | None, images: int, **fields) -> dict:
    """Token figures; the fraction is of the samples that carry an image (None: a text-only source has none)."""
    top = [] if counts is None else np.argsort(counts, kind="stable")[::-1][:TOP_CODES]
    return {
        **fields,
        "samples_with_image": images,
        "tokenized_fraction": round(fields["samples_tokenized"] / images, 4) if images else None,
        "failure_reasons": dict(fields["failure_reasons"].most_common()),
        "codebooks": sorted(fields["codebooks"]),
        "codes_used": None if counts is None else int((counts > 0).sum()),
        "top_codes": None if counts is None else [[int(c), int(counts[c])] for c in top if counts[c]],
        "code_counts": counts,  # the views drop it (8192 numbers); plots use it
    }


# --- distributions from the parquet files --------------------------------------------------------

ROW_COLUMNS = ["status", "kept_captions", "original_width", "original_height", "image_bytes"]


def written_rows(out: Path, source: str, sample_shards: int = DEFAULT_SAMPLE_SHARDS) -> tuple[pl.DataFrame, int]:
    """(written rows, shards read) of an evenly spaced subset of finished shards: caption words and image sizes."""
    parquets = [p.removesuffix(STATS_SUFFIX) + PARQUET_SUFFIX for p in shard_stats_files(out, source)]
    parquets = evenly_spaced(parquets, sample_shards)
    if not parquets:
        return pl.DataFrame(schema={"words": pl.List(pl.Int64), **{c: pl.Int64 for c in ROW_COLUMNS[2:]}}), 0
    if is_remote(as_path(parquets[0])):
        rows = pl.concat([_written(p) for p in parquets])
    else:  # polars' lazy scan reads only these columns of every local file at once
        rows = pl.scan_parquet(parquets).select(ROW_COLUMNS).filter(pl.col("status") == "written").collect()
    columns = rows.select(
        words=pl.col("kept_captions").list.eval(pl.element().str.count_matches(r"\S+")),
        original_width=pl.col("original_width").cast(pl.Int64),
        original_height=pl.col("original_height").cast(pl.Int64),
        image_bytes=pl.col("image_bytes").cast(pl.Int64),
    )
    return columns, len(parquets)


def _written(parquet: str) -> pl.DataFrame:
    with as_path(parquet).open("rb") as f:  # a local file or an object: read through the storage layer
        return pl.read_parquet(f, columns=ROW_COLUMNS).filter(pl.col("status") == "written")


def evenly_spaced(items: list, n: int) -> list:
    """At most n items spread over the whole list (first and last included); n = 0 keeps all."""
    if n <= 0 or len(items) <= n:
        return items
    if n == 1:
        return items[:1]
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def _distribution(rows: pl.DataFrame, shards_read: int) -> dict:
    words = rows["words"].list.explode().drop_nulls()
    return {
        "shards_read": shards_read,
        "pairs_read": words.len(),
        "caption_words": _percentiles(words),
        "original_width": _percentiles(rows["original_width"].drop_nulls()),
        "original_height": _percentiles(rows["original_height"].drop_nulls()),
        "image_bytes": _percentiles(rows["image_bytes"].drop_nulls()),
    }


def _percentiles(values: pl.Series) -> dict | None:
    if values.len() == 0:
        return None
    return {f"p{q}": float(values.quantile(q / 100, interpolation="linear")) for q in PERCENTILES}
