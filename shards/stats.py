"""Build statistics from the per-shard stats files (never the tars): per source and in total."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pmd_pipeline.errors import PmdError

SUMMED = ("rows_in", "samples_written", "pairs_written", "caption_words", "fetch_attempted", "tar_bytes")


def collect_stats(out: Path, source: str | None = None) -> dict:
    """{'sources': {name: summary}, 'total': summary} for a build folder."""
    if not (out / "config.json").exists():
        raise PmdError(f"{out} is not a pmd build output (no config.json)")
    names = sorted(p.parent.name for p in out.glob("_plan/*/_plan.json"))
    if source is not None:
        if source not in names:
            raise PmdError(f"no source {source!r} in {out}; it has: {', '.join(names) or 'none'}")
        names = [source]
    sources = {name: _source_summary(out, name) for name in names}
    return {"sources": sources, "total": _merge(list(sources.values()))}


def _source_summary(out: Path, name: str) -> dict:
    plan = json.loads((out / "_plan" / name / "_plan.json").read_text())
    shards = [json.loads(p.read_text()) for p in sorted((out / name).glob("*_stats.json"))]
    summary = _merge(shards)
    summary["shards_planned"] = plan["shards"]
    summary["rejected_raw_records"] = plan["rejected_raw_records"]
    summary["rejected_by_reason"] = plan["rejected_by_reason"]
    return _derived(summary)


def _merge(parts: list[dict]) -> dict:
    merged = {key: sum(p.get(key, 0) for p in parts) for key in SUMMED}
    merged["shards"] = sum(p.get("shards", 1) for p in parts)
    merged["shards_planned"] = sum(p.get("shards_planned", 0) for p in parts)
    merged["rejected_raw_records"] = sum(p.get("rejected_raw_records", 0) for p in parts)
    for key in ("rows_dropped", "rows_failed", "captions_dropped", "rejected_by_reason"):
        merged[key] = dict(sum((Counter(p.get(key, {})) for p in parts), Counter()).most_common())
    return _derived(merged)


def _derived(s: dict) -> dict:
    failed = sum(s["rows_failed"].values())
    s["fetch_success_rate"] = round(1 - failed / s["fetch_attempted"], 4) if s["fetch_attempted"] else None
    s["mean_caption_words"] = round(s["caption_words"] / s["pairs_written"], 2) if s["pairs_written"] else None
    return s
