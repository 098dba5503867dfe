"""Fetch throughput: `pmd build` vs bare img2dataset on the same 3,000 URLs, same server, size and processes."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.local_web import make_images, serve

N_URLS = 3000
PROCESSES = 2
THREADS = 32
SHARD = 500  # 6 shards: both tools get the same parallelism over 2 processes
ROUNDS = 2


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_fetch_"))
    names = make_images(work / "web", N_URLS)
    server, base = serve(work / "web")
    try:
        tsv = work / "urls.tsv"
        tsv.write_text(
            "".join(f"a synthetic photo number {i} of the benchmark\t{base}/{n}\n" for i, n in enumerate(names))
        )
        ray_start = _start_ray()
        times = {"img2dataset": [], "pmd": []}
        for round_ in range(ROUNDS):
            times["img2dataset"].append(_time_img2dataset(tsv, work / f"i2d_{round_}"))
            times["pmd"].append(_time_pmd(tsv, work / f"pmd_{round_}", base))
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    return {
        "urls": N_URLS,
        "processes": PROCESSES,
        "threads": THREADS,
        "image_size": 224,
        "rounds": ROUNDS,
        "seconds": times,
        "images_per_s": {k: round(N_URLS / v, 1) for k, v in best.items()},
        "ratio_pmd_vs_img2dataset": round(best["img2dataset"] / best["pmd"], 3),
        "median_ratio": round(statistics.median(times["img2dataset"]) / statistics.median(times["pmd"]), 3),
        "ray_start_seconds": round(ray_start, 2),
        "note": "pmd time = plan + filter + fetch + write + manifest on an already started local Ray (2 CPUs)",
    }


def _start_ray() -> float:
    import ray

    started = time.time()
    ray.init(num_cpus=PROCESSES, include_dashboard=False, logging_level=logging.WARNING)
    return time.time() - started


def _time_img2dataset(tsv: Path, out: Path) -> float:
    from img2dataset import download

    # img2dataset's tsv reader wants a header row naming the columns; made before the clock starts.
    with_header = tsv.with_suffix(".header.tsv")
    with_header.write_text("caption\turl\n" + tsv.read_text())
    started = time.time()
    download(
        url_list=str(with_header),
        input_format="tsv",
        url_col="url",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        image_size=224,
        resize_mode="center_crop",
        processes_count=PROCESSES,
        thread_count=THREADS,
        number_sample_per_shard=SHARD,
        extract_exif=False,
        compute_hash=None,
        timeout=10,
        retries=0,
    )
    elapsed = time.time() - started
    assert sum(1 for _ in out.glob("*.tar")) == N_URLS // SHARD
    return elapsed


def _time_pmd(tsv: Path, out: Path, base: str) -> float:
    from pmd_pipeline.build import build
    from pmd_pipeline.config import BuildConfig, SourceConfig

    cfg = BuildConfig(
        out=str(out), shard_size=SHARD, sources=[SourceConfig("conceptual_captions", metadata=[str(tsv)])]
    )
    cfg.fetch.thread_count, cfg.fetch.retries = THREADS, 0
    cfg.fetch.max_per_host = THREADS  # one local host serves everything: no politeness limit in a speed test
    cfg.fetch.allowed_private_hosts = [urlsplit(base).netloc]  # the bench server's host:port, that port only
    cfg.tokenize.enabled = False  # fetch is measured here; the dVAE stage has its own bench
    started = time.time()
    result = build(cfg)
    elapsed = time.time() - started
    assert result.manifest["totals"]["samples_written"] == N_URLS, result.manifest["totals"]
    return elapsed
