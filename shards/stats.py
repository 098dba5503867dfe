"""Build statistics from the per-shard stats, dVAE sidecar and parquet files (never the tars): per source and in total.

Counts are exact sums of the shards' `_stats.json`. Distributions (median caption words, image size
percentiles) need the rows, so they come from the parquet files of an evenly spaced subset of each
source's shards (`sample_shards`, 0 = all): 10,000 shards take about 1.4 s of CPU (docs/bench_stats.md).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from pmd_pipeline.errors import PmdError
from shards.layout import SIDECAR_SUFFIX

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
CODEBOOK_SIZE = 8192
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
    total["paper"] = _paper_total([s["paper"] for s in sources.values()])
    total["tokens"] = _merge_tokens([s["tokens"] for s in sources.values()], total["shards"])
    total["distribution"] = None  # percentiles do not add up across sources
    return {"out": str(out), "sources": sources, "total": total, "manifest_tokens": _manifest_tokens(out)}


def _manifest_tokens(out: Path) -> dict | None:
    """The manifest's top-level "tokens" entry (codebook, random, note) once the tokenize stage has run."""
    path = out / "manifest.json"
    return json.loads(path.read_bytes()).get("tokens") if path.exists() else None


def source_names(out: Path, source: str | None = None) -> list[str]:
    """The sources a build planned (all, or the one asked for, with a clear error when it is not there)."""
    if not (out / "config.json").exists():
        raise PmdError(f"{out} is not a pmd build output (no config.json)")
    names = sorted(p.parent.name for p in out.glob("_plan/*/_plan.json"))
    if source is None:
        return names
    if source not in names:
        raise PmdError(f"no source {source!r} in {out}; it has: {', '.join(names) or 'none'}")
    return [source]


def shard_stats_files(out: Path, source: str) -> list[str]:
    """Finished shards of a source (their stats file is the completion marker), in shard order."""
    return _files_ending(out / source, "_stats.json")


def _files_ending(folder: Path, suffix: str) -> list[str]:
    """Sorted paths (str) of a folder's files by name suffix: os.listdir and str, 10x faster than Path at 10k files."""
    if not folder.is_dir():
        return []
    return [os.path.join(folder, name) for name in sorted(n for n in os.listdir(folder) if n.endswith(suffix))]


def _load_stats(path: str) -> dict:
    try:
        return json.loads(_read_bytes(path))
    except ValueError as err:
        raise PmdError(
            f"{path}: unreadable shard stats ({err}); delete it and re-run `pmd build` to redo the shard"
        ) from None


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _source_summary(out: Path, name: str, sample_shards: int, codes: bool) -> dict:
    plan = json.loads((out / "_plan" / name / "_plan.json").read_text())
    shards = [_load_stats(p) for p in shard_stats_files(out, name)]
    finished = {s["shard"] for s in shards}  # a sidecar counts only beside a finished shard
    sidecars = {k: v for k, v in read_sidecars(out, name, with_codes=codes).items() if k in finished}
    for shard in shards:  # a tokenized shard's tar was rewritten: its size is the sidecar's
        if shard["shard"] in sidecars:
            shard["tar_bytes"] = sidecars[shard["shard"]]["tar_bytes"]
    summary = _merge(shards)
    summary["shards_planned"] = plan["shards"]
    summary["rejected_raw_records"] = plan["rejected_raw_records"]
    summary["rejected_by_reason"] = plan["rejected_by_reason"]
    summary["paper"] = paper_figures(name)
    summary["tokens"] = _tokens(list(sidecars.values()), summary["shards"])
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


# --- the paper's figures -------------------------------------------------------------------------


def paper_figures(name: str) -> dict | None:
    """FLAVA Table 2's pairs and mean words for a registered PMD source (None for unimodal or unknown ones)."""
    from sources import REGISTRY

    source = REGISTRY.get(name)
    if source is None or not source.info.paper_pairs:
        return None
    return {"pairs_millions": source.info.paper_pairs, "mean_words": source.info.paper_avg_words}


def _paper_total(figures: list[dict | None]) -> dict | None:
    """The paper's total over the sources of this build: pairs add up, mean words weighted by pairs."""
    known = [f for f in figures if f]
    if not known:
        return None
    pairs = sum(f["pairs_millions"] for f in known)
    words = sum(f["pairs_millions"] * f["mean_words"] for f in known) / pairs
    return {"pairs_millions": round(pairs, 2), "mean_words": round(words, 2)}


# --- dVAE token sidecars -------------------------------------------------------------------------


def read_sidecars(out: Path, source: str, with_codes: bool = False) -> dict[str, dict]:
    """{shard name: sidecar} for the tokenized shards of a source (NNNNN_dvae.json marks a shard tokenized).

    The 8192 code counts are nearly all of a sidecar's bytes (400 MB of JSON for 10,000 shards), so they are
    parsed only when asked for (`pmd stats --codes`, `--plots`); otherwise code_counts is None.
    """
    return {
        os.path.basename(path).removesuffix(SIDECAR_SUFFIX): parse_sidecar(path, with_codes)
        for path in _files_ending(out / source, SIDECAR_SUFFIX)
    }


def parse_sidecar(path: str, with_codes: bool) -> dict:
    """One sidecar; its code_counts None unless `with_codes` (they are 97% of its bytes and of the parse time)."""
    data = _read_bytes(path)
    try:
        start = data.find(b'"code_counts"')
        begin, end = data.index(b"[", start), data.index(b"]", start)  # a flat list of integers
        sidecar = json.loads(data[:start] + b'"code_counts": null' + data[end + 1 :])
        if with_codes:
            sidecar["code_counts"] = _int_list(data[begin + 1 : end])
    except (ValueError, KeyError, TypeError) as err:
        raise PmdError(f"{path}: unreadable dVAE sidecar ({err}); re-run the tokenize stage for this shard") from None
    return sidecar


def _int_list(text: bytes) -> np.ndarray:
    """The 8192 code counts; numpy's text parser is 10x faster than json.loads + np.asarray here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partly parsed list warns; make it an error
        counts = np.fromstring(text.decode("ascii"), dtype=np.int64, sep=",")
    if len(counts) != CODEBOOK_SIZE:
        raise ValueError(f"{len(counts)} code counts, expected {CODEBOOK_SIZE}")
    return counts


def code_counts(sidecars: list[dict]) -> np.ndarray | None:
    """How often each of the 8192 codebook entries occurs, summed over shards (None when not read)."""
    if any(s["code_counts"] is None for s in sidecars):
        return None
    total = np.zeros(CODEBOOK_SIZE, dtype=np.int64)
    for sidecar in sidecars:
        total += np.asarray(sidecar["code_counts"], dtype=np.int64)
    return total


def _tokens(sidecars: list[dict], shards: int) -> dict:
    failures = Counter()
    for s in sidecars:
        failures.update(s["failure_reasons"])
    return _token_summary(
        code_counts(sidecars),
        shards,
        shards_tokenized=len(sidecars),
        samples_tokenized=sum(s["samples_tokenized"] for s in sidecars),
        samples_failed=sum(s["samples_failed"] for s in sidecars),
        failure_reasons=failures,
        codebooks={s["codebook"] for s in sidecars},
        codebook_random=any(s["codebook_random"] for s in sidecars),
    )


def _merge_tokens(parts: list[dict], shards: int) -> dict:
    failures = Counter()
    for p in parts:
        failures.update(p["failure_reasons"])
    counts = [p["code_counts"] for p in parts]
    return _token_summary(
        None if any(c is None for c in counts) else sum(counts, np.zeros(CODEBOOK_SIZE, dtype=np.int64)),
        shards,
        shards_tokenized=sum(p["shards_tokenized"] for p in parts),
        samples_tokenized=sum(p["samples_tokenized"] for p in parts),
        samples_failed=sum(p["samples_failed"] for p in parts),
        failure_reasons=failures,
        codebooks={c for p in parts for c in p["codebooks"]},
        codebook_random=any(p["codebook_random"] for p in parts),
    )


def _token_summary(counts: np.ndarray | None, shards: int, **fields) -> dict:
    top = [] if counts is None else np.argsort(counts, kind="stable")[::-1][:TOP_CODES]
    return {
        **fields,
        "tokenized_fraction": round(fields["shards_tokenized"] / shards, 4) if shards else None,
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
    parquets = [p.removesuffix("_stats.json") + ".parquet" for p in shard_stats_files(out, source)]
    parquets = evenly_spaced(parquets, sample_shards)
    if not parquets:
        return pl.DataFrame(schema={"words": pl.List(pl.Int64), **{c: pl.Int64 for c in ROW_COLUMNS[2:]}}), 0
    rows = pl.scan_parquet(parquets).select(ROW_COLUMNS).filter(pl.col("status") == "written").collect()
    columns = rows.select(
        words=pl.col("kept_captions").list.eval(pl.element().str.count_matches(r"\S+")),
        original_width=pl.col("original_width").cast(pl.Int64),
        original_height=pl.col("original_height").cast(pl.Int64),
        image_bytes=pl.col("image_bytes").cast(pl.Int64),
    )
    return columns, len(parquets)


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
