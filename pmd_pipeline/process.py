"""The flow of one shard: filter -> fetch/read -> resize -> dVAE tokens -> write the tar once -> stats last.

The stats file, written last, marks the shard finished; with tokens, the `_dvae.json` sidecar comes just
before it. Tokens are made by an actor of the build's pool while other shards go on fetching.
"""

from __future__ import annotations

import time

import polars as pl

from filters import apply_filters, build_filters
from pmd_pipeline.config import BuildConfig, FilterConfig
from pmd_pipeline.faults import crash_point
from pmd_pipeline.fetch.images import fetch_urls, read_local
from pmd_pipeline.progress import Reporter
from pmd_pipeline.storage import remove_tree
from pmd_pipeline.tokens.stage import ShardTokens
from shards.files import atomic_write_json, owned_path, remove_temp_files
from shards.layout import ShardPaths
from shards.sidecar import write_sidecar
from shards.writer import write_shard
from sources import get_source


def process_shard(
    cfg: BuildConfig,
    paths: ShardPaths,
    node: str | None = None,
    tokens: ShardTokens | None = None,
    counter=None,
) -> dict:
    """Turn one plan shard into a finished shard; a finished shard is returned as is, never rewritten.

    `node`: the Ray node that ran it, recorded in the stats (which machine of a cluster made which shard).
    `tokens`: the token actor this shard's images go to (None: no tokens). `counter`: the build's
    ProgressCounter (None: nothing is counted)."""
    if paths.is_done():
        return {"skipped": True, "source": paths.source, "shard": paths.name}
    started = time.time()
    owned_path(paths.out, paths.work)  # img2dataset writes and deletes there
    remove_temp_files(paths.folder, paths.name, within=paths.out)  # of an attempt that was killed; redone from the plan
    with paths.plan.open("rb") as f:
        rows = filter_rows(cfg, pl.read_parquet(f), paths.source)
    if tokens:
        tokens.give_way()
    progress = Reporter(counter, "fetch")
    calibration = tokens.calibration_feed(image_rows(rows)["key"].to_list()) if tokens else None

    def on_image(key: str, got) -> None:
        progress.add(images=got.jpg is not None, failed=got.jpg is None)
        if calibration:
            calibration(key, got)

    fetched = fetch_images(cfg, rows, paths, on_image)
    progress.add(shards=1)
    progress.flush()
    if calibration:
        calibration.finish(fetched)
    made = tokens.request(fetched, paths.out) if tokens else None
    stats = write_shard(paths, rows, fetched, made[0] if made else None)
    if made:
        write_sidecar(paths, tokens.sidecar(*made, stats))
    crash_point("before_stats", paths.out)
    stats["seconds"] = round(time.time() - started, 3)
    stats["node"] = node
    atomic_write_json(paths.stats, stats, within=paths.out)  # last: the completion marker
    remove_tree(owned_path(paths.out, paths.work))
    return stats


def filter_rows(cfg: BuildConfig, plan: pl.DataFrame, source: str) -> pl.DataFrame:
    return apply_filters(plan, build_filters(filter_chain(cfg, source)))


def filter_chain(cfg: BuildConfig, source: str) -> list[FilterConfig]:
    """The source's `filters` from the config, else the source's own rule, else the build's global list."""
    source_cfg = next(s for s in cfg.sources if s.name == source)
    if source_cfg.filters is not None:
        return source_cfg.filters
    default = get_source(source).default_filters
    return list(default) if default is not None else cfg.filters


def fetch_images(cfg: BuildConfig, rows: pl.DataFrame, paths: ShardPaths, on_image=None) -> dict:
    """{key: Fetched} for every wanted row with an image (`image_rows`); `on_image(key, fetched)` is called as
    each one is known."""
    wanted = image_rows(rows)
    from_urls = wanted.filter(pl.col("image_path").is_null())
    from_files = wanted.filter(pl.col("image_path").is_not_null())
    fetched = fetch_urls(from_urls.select("key", "image_url"), cfg, paths.work, on_image) if from_urls.height else {}
    if from_files.height:
        fetched.update(read_local(from_files.select("key", "image_path", "crop_box"), cfg, on_image))
    return fetched


def image_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """The rows `fetch_images` gives an outcome, in plan order: wanted rows with an image URL or path."""
    has_image = pl.col("image_url").is_not_null() | pl.col("image_path").is_not_null()
    return rows.filter(pl.col("reason").is_null() & has_image)
