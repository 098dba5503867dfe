"""Storage figures on a real S3 server (moto's, on 127.0.0.1), each a ratio measured in this run:

- build: the embedded default (no tokens) into s3://bucket vs into a local folder, same config and URLs;
- upload path: every file of that build written through our storage layer (shards.files.atomic_path: a local
  temporary file, then one upload) vs a bare s3fs `put_file` of the same files: ours / bare, target >= 0.9;
- loader: the trainer's loader streaming the fixture shards from the bucket vs from local disk, same workers,
  target >= 0.8.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 2
LOADER_BATCHES, BATCH = 40, 16


def run() -> dict:
    from tests.s3_server import s3_server

    work = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    with s3_server(buckets=("bucket",), own_process=True):
        build = build_figures(work)
        upload = upload_figures(work / "local_0")
        loader = loader_figures(work)
    note = "moto is a single Python process: its request handling, not the network, bounds S3 times"
    return {"build": build, "upload": upload, "loader": loader, "note": note}


def build_figures(work: Path) -> dict:
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for round_ in range(ROUNDS):  # alternated, so drift in the machine's load hits both alike
        times["local"].append(_timed_build(str(work / f"local_{round_}")))
        times["s3"].append(_timed_build(f"s3://bucket/build_{round_}"))
    best = {k: min(v) for k, v in times.items()}
    return {
        "seconds": times,
        "ratio_s3_vs_local_throughput": round(best["local"] / best["s3"], 3),
        "median_ratio": round(statistics.median(times["local"]) / statistics.median(times["s3"]), 3),
    }


def _timed_build(out: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pmd_pipeline.cli", "build", "--out", out, "--no-tokenize"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return time.perf_counter() - started


def upload_figures(local_build: Path) -> dict:
    from pmd_pipeline.storage import as_path
    from shards.files import atomic_path

    files = [p for p in local_build.rglob("*") if p.is_file() and "_embedded" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    fs = as_path("s3://bucket").fs
    ours, bare = [], []
    for round_ in range(3):
        started = time.perf_counter()
        for p in files:
            with atomic_path(as_path(f"s3://bucket/ours_{round_}/{p.relative_to(local_build)}")) as tmp:
                tmp.write_bytes(p.read_bytes())  # what a stage does: write its file, then the layer uploads it
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        for p in files:
            fs.put_file(str(p), f"bucket/bare_{round_}/{p.relative_to(local_build)}")
        bare.append(time.perf_counter() - started)
    return {
        "files": len(files),
        "mib": round(total / 2**20, 2),
        "ours_s": ours,
        "bare_s3fs_s": bare,
        "ratio_ours_vs_bare_throughput": round(min(bare) / min(ours), 3),
        "target": ">= 0.9",
    }


def loader_figures(work: Path) -> dict:
    from pmd_pipeline.storage import as_path
    from pmd_pipeline.train.config import DataConfig
    from pmd_pipeline.train.preflight import preflight
    from pmd_pipeline.train.tokenizer import prepare_tokenizer
    from tests.train_fixtures import make_pmd

    root = make_pmd(work / "train" / "pmd", per_shard=96, shards=2)
    as_path("s3://bucket").fs.put(str(root), "bucket/train", recursive=True)
    local = preflight(DataConfig(shards=str(root))).tars["pairs"]
    remote = preflight(DataConfig(shards="s3://bucket/train")).tars["pairs"]
    tok = str(prepare_tokenizer("", work / "run", local, 500))
    rates: dict[str, list[float]] = {"local": [], "s3": []}
    for _ in range(ROUNDS):
        for name, tars in (("local", local), ("s3", remote)):
            rates[name].append(_loader_rate(tars, tok))
    best = {k: max(v) for k, v in rates.items()}
    return {
        "workers": 2,
        "samples_per_s": rates,
        "ratio_s3_vs_local": round(best["s3"] / best["local"], 3),
        "target": ">= 0.8",
        "load_average": os.getloadavg()[0],
    }


def _loader_rate(tars: list[str], tok: str) -> float:
    from pmd_pipeline.train.data import TaskStream, make_loader

    batches = make_loader(TaskStream("pairs", tars, tok, BATCH, 32, 0, 0, 1), workers=2)
    for _ in range(6):  # start-up and the workers' prefetched batches are not throughput
        next(batches)
    started = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(batches)
    rate = LOADER_BATCHES * BATCH / (time.perf_counter() - started)
    batches.close()
    return round(rate, 1)
