"""`pmd plan CONFIG`: what a build will download, make and cost, before any of it is done.

Per source: its files and their sizes (remote ones from the first byte of a ranged GET, which every server
of the recipe answers with the total size; nothing else is downloaded), its rows and expected pairs (from
a sample of the metadata when the metadata is readable without a download: local, in a bucket, or already
downloaded into OUT), its shards, output bytes, and the hours the build takes on N nodes at the per-core
rates measured in BENCHMARKS.md. Without readable metadata the pairs are the paper's (FLAVA, Table 2).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import urllib.request

import polars as pl

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.downloads import download_file, downloads_of, is_url, localized, split_member
from pmd_pipeline.fetch.mirror import rewrite_url
from pmd_pipeline.fetch.web import WebPolicy, stream_url
from pmd_pipeline.plan import merge_rows_by_key
from pmd_pipeline.storage import as_path
from sources import get_source
from sources.base import RejectLog

log = logging.getLogger(__name__)

SAMPLE_ROWS = 2000  # candidate rows read from each source's metadata for its keep rate and pairs per row

# Per-core rates measured on this project's CI class of machine (BENCHMARKS.md). They are what the code
# does on one core; a real crawl is usually bounded by the sites instead (link rot, rate limits).
RATES = {
    # `just bench fetch`: 428 images/s on 2 cores from a local server (fetch, resize, write): per core
    "fetch_images_per_core_s": 214.0,
    # `just bench vg`: 226 region crops/s on 2 loaded cores (read from a local zip, crop, resize, encode)
    "local_images_per_core_s": 113.0,
    # `just bench yfcc`: 31,012 rows/s on one core (read, decode, filter); other readers are faster
    "metadata_rows_per_core_s": 31_000.0,
    # `just bench dvae`: fp32 3.7 images/s on 2 cores (int8 18.7); per core
    "tokens_per_core_s_fp32": 1.85,
    "tokens_per_core_s_int8": 9.3,
}
# A GPU's dVAE rate was not measured here (no GPU lent yet): 52 GFLOP an image at a third of an A100's
# 312 bf16 TFLOP/s. Replace with `just bench dvae` on a GPU when one is measured.
TOKENS_PER_GPU_S = 2000.0
# Bytes of one sample in the shards: a 224 px JPEG at quality 95 of a real photo (~24 KB; the synthetic
# images of the benches are smaller), its 14x14 uint16 tokens as .npy (520 B), text and json (~0.6 KB).
BYTES_PER_IMAGE_SAMPLE = 25_000
# Unimodal corpora have no paper pairs: ImageNet-1k's training images; a text corpus is the user's own
UNIMODAL_SAMPLES = {"imagenet": 1_281_167}
BYTES_PER_TEXT_SAMPLE = 1_500


@dataclasses.dataclass
class Cluster:
    nodes: int = 1
    cpus_per_node: int = 32
    gpus_per_node: int = 0
    download_mb_s: float = 100.0  # per node: how fast the sources' servers send


def plan_config(cfg: BuildConfig, cluster: Cluster, sample_rows: int = SAMPLE_ROWS, count: bool = False) -> dict:
    """The dry run: one entry per enabled source and the totals (see the module's docstring).

    `count`: download the metadata given as URLs (into OUT/_downloads, where the build then finds them; image
    archives are never downloaded by a plan) so that every source's rows are counted, not taken from the paper."""
    policy = WebPolicy.from_config(cfg.fetch)
    if count:
        _download_metadata(cfg)
    sizes: dict[str, int | None] = {}
    sources = [_plan_one(cfg, s, policy, sizes, sample_rows) for s in cfg.enabled_sources()]
    download_bytes = sum(v for f, v in sizes.items() if v and is_url(f))
    input_bytes = sum(v for v in sizes.values() if v)
    output_bytes = sum(s["output_bytes"] for s in sources)
    hours = _hours(sources, download_bytes, cluster, cfg.tokenize)
    return {
        "sources": sources,
        "totals": {
            "files": len(sizes),
            "download_bytes": download_bytes,  # of the files given as URLs, which the build downloads into OUT
            "input_bytes": input_bytes,
            "unknown_sizes": sorted(f for f, v in sizes.items() if v is None),
            "rows": sum(s["rows"] or 0 for s in sources),
            "expected_pairs": sum(s["expected_pairs"] for s in sources),
            "expected_samples": sum(s["expected_samples"] for s in sources),
            "shards": sum(s["shards"] for s in sources),
            "output_bytes": output_bytes,
            # downloads stay in OUT/_downloads beside the shards; the plan adds ~1% and img2dataset's work
            # files one shard per CPU
            "peak_disk_bytes": int(download_bytes + output_bytes * 1.01 + _scratch_bytes(cfg, cluster)),
            "hours": hours,
        },
        "cluster": dataclasses.asdict(cluster),
        "rates": {**RATES, "tokens_per_gpu_s": TOKENS_PER_GPU_S, "bytes_per_image_sample": BYTES_PER_IMAGE_SAMPLE},
    }


def _plan_one(cfg: BuildConfig, source_cfg: SourceConfig, policy: WebPolicy, sizes: dict, sample_rows: int) -> dict:
    source = get_source(source_cfg.name)
    files = []
    for path in input_files(source_cfg):
        if path not in sizes:
            sizes[path] = file_size(path, cfg, policy)
        files.append({"path": path, "bytes": sizes[path]})
    downloaded = localized(cfg, source_cfg)  # metadata an earlier build or `--count` downloaded is counted
    counted = _count(cfg, source, downloaded, sample_rows) if _metadata_readable(downloaded) else None
    if counted is None:  # remote metadata: the paper's count (the pipeline keeps what the paper kept)
        pairs = round(source.info.paper_pairs * 1e6 / _sharing(source.info))
        samples = pairs or UNIMODAL_SAMPLES.get(source_cfg.name, 0)
        images_from = "local archives" if source_cfg.images else "URLs"
        counted = {"rows": None, "planned": samples, "estimate": "paper", "pairs": pairs, "samples": samples}
        counted.update(image_samples=samples, images_from=images_from)
    image_samples = counted.pop("image_samples")
    samples = counted["samples"]
    return {
        "source": source_cfg.name,
        "files": files,
        "rows": counted["rows"],
        "estimate": counted["estimate"],
        "expected_pairs": counted["pairs"],
        "expected_samples": samples,
        "shards": math.ceil(counted["planned"] / cfg.shard_size),
        "output_bytes": image_samples * BYTES_PER_IMAGE_SAMPLE + (samples - image_samples) * BYTES_PER_TEXT_SAMPLE,
        "images_from": counted["images_from"],
    }


def _sharing(info) -> int:
    """Sources that share one paper figure (Localized Narratives' four subsets): each gets an even part."""
    from sources import paper_group_members

    return len(paper_group_members(info.paper_group)) if info.paper_group else 1


def input_files(source_cfg: SourceConfig) -> list[str]:
    """Every file the source reads, once each: archives of `archive::member` entries, image archives, and
    options that name files (the Karpathy split)."""
    entries = [*source_cfg.metadata, *source_cfg.images.values()]
    entries += [v for k, v in source_cfg.options.items() if k.endswith(("_file", "_dir")) and isinstance(v, str)]
    return list(dict.fromkeys(split_member(e)[0] for e in entries))


def file_size(path: str, cfg: BuildConfig, policy: WebPolicy) -> int | None:
    """Bytes of a local, bucket or remote file; None when it cannot be known (missing, or no size sent)."""
    if not is_url(path):
        location = as_path(path)
        if not location.exists():
            return None
        return location.stat().st_size if location.is_file() else _folder_bytes(location)
    request = urllib.request.Request(rewrite_url(path, cfg.fetch.mirror), headers={"Range": "bytes=0-0"})
    try:
        with stream_url(request, policy) as response:
            total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
            if response.status == 206 and total.isdigit():
                return int(total)
            length = response.headers.get("Content-Length") or ""
            return int(length) if response.status == 200 and length.isdigit() else None
    except OSError as err:  # offline, or the host is down: the plan goes on without this size
        log.warning("could not learn the size of %s: %s", path, err)
        return None


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _metadata_readable(source_cfg: SourceConfig) -> bool:
    """Metadata the plan may read: local, in a bucket, or downloaded (URLs are downloaded by the build)."""
    files = [split_member(m)[0] for m in source_cfg.metadata]
    return not any(is_url(f) for f in files) and all(as_path(f).exists() for f in files)


def _download_metadata(cfg: BuildConfig) -> None:
    """The metadata and split files of every enabled source, one after another (no Ray: a plan is small)."""
    metadata_only = [dataclasses.replace(s, images={}) for s in cfg.enabled_sources()]
    for job in downloads_of(cfg, metadata_only):
        download_file(job, cfg.fetch, cfg.out)


def _count(cfg: BuildConfig, source, source_cfg: SourceConfig, sample_rows: int) -> dict | None:
    """Every candidate row counted with the source's own reader (what the plan stage reads), and the source's
    rules run on the first `sample_rows` of them (the filters are the costly part: langdetect for YFCC)."""
    from pmd_pipeline.process import filter_rows

    rows, sample = 0, []
    try:
        for batch in source.read(source_cfg, RejectLog()):
            if rows < sample_rows:
                sample.append(batch.head(sample_rows - rows))
            rows += batch.height
            if source_cfg.limit and rows >= source_cfg.limit:
                rows = source_cfg.limit
                break
    except PmdError:
        return None  # e.g. a manual step's file is missing: `pmd build` says what to get
    if not rows:
        return {"rows": 0, "planned": 0, "estimate": "counted", "pairs": 0, "samples": 0, "image_samples": 0,
                "images_from": "none"}  # fmt: skip
    frame = pl.concat(sample)
    candidates = frame.height
    if source.repeats_keys:
        frame = merge_rows_by_key(frame.lazy()).collect()
    planned = frame.height  # the plan's rows, which its shards hold
    kept = filter_rows(cfg, frame, source_cfg.name).filter(pl.col("reason").is_null())
    with_image = kept.filter(pl.col("image_url").is_not_null() | pl.col("image_path").is_not_null())
    pairs = int(kept["kept_captions"].list.len().fill_null(0).sum())
    scale = rows / candidates
    images_from = "URLs" if with_image["image_url"].is_not_null().any() else "local archives"
    return {
        "rows": rows,
        "planned": round(planned * scale),
        "estimate": "counted" if candidates == rows else "sampled",
        "rules_on_rows": candidates,
        "pairs": round(pairs * scale),
        "samples": round(kept.height * scale),
        "image_samples": round(with_image.height * scale),
        "images_from": images_from if with_image.height else "none",
    }


def _scratch_bytes(cfg: BuildConfig, cluster: Cluster) -> float:
    return cluster.nodes * cluster.cpus_per_node * cfg.shard_size * BYTES_PER_IMAGE_SAMPLE * 2


def _hours(sources: list[dict], download_bytes: int, cluster: Cluster, tcfg) -> dict:
    """Hours of each stage on the cluster; the stages of a streaming build overlap, so the build takes
    about the longest one after the downloads."""
    cores = cluster.nodes * cluster.cpus_per_node
    urls = sum(s["expected_samples"] for s in sources if s["images_from"] == "URLs")
    local = sum(s["expected_samples"] for s in sources if s["images_from"] == "local archives")
    images = urls + local
    if cluster.gpus_per_node:
        token_rate = cluster.nodes * cluster.gpus_per_node * TOKENS_PER_GPU_S
    else:
        per_core = RATES["tokens_per_core_s_int8" if tcfg.precision == "int8" else "tokens_per_core_s_fp32"]
        token_rate = cores * per_core
    rows = sum(s["rows"] or s["expected_pairs"] for s in sources)
    stages = {
        "download": download_bytes / (cluster.nodes * cluster.download_mb_s * 1e6) / 3600,
        "metadata": rows / (cores * RATES["metadata_rows_per_core_s"]) / 3600,
        "fetch": (urls / RATES["fetch_images_per_core_s"] + local / RATES["local_images_per_core_s"]) / cores / 3600,
        "tokens": images / token_rate / 3600 if tcfg.enabled else 0.0,
    }
    stages["build"] = stages["download"] + stages["metadata"] + max(stages["fetch"], stages["tokens"])
    return {k: round(v, 4) for k, v in stages.items()}
