"""`pmd stats` on a synthetic build of 10,000 finished shards (stats json + parquet + dVAE sidecar each),
through the CLI, vs reading the same numbers by opening every tar (measured on a subset, extrapolated)."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import webdataset as wds
from PIL import Image

SHARDS = 10_000
ROWS_PER_SHARD = 200
TAR_SUBSET = 100  # shards read through their tars; the tar path is extrapolated to SHARDS from these
REPEATS = 3
SOURCES = ("coco", "conceptual_captions", "sbu_captions", "red_caps")  # folder names only; any names work


def run(args=None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_stats_"))
    try:
        out = make_build(root / "out")
        cli = [_time_cli(out) for _ in range(REPEATS)]  # (wall, cpu) pairs
        with_codes = _time_cli(out, "--codes")  # also parses the 8192 code counts of every sidecar
        tars = sorted(out.glob("*/0*.tar"))[:: SHARDS // TAR_SUBSET][:TAR_SUBSET]
        tar = [_time(lambda: numbers_from_tars(tars)) for _ in range(REPEATS)]
        scale = SHARDS / len(tars)
        cli_wall, cli_cpu = (statistics.median(t[i] for t in cli) for i in (0, 1))
        tar_wall, tar_cpu = (statistics.median(t[i] for t in tar) * scale for i in (0, 1))
        return {
            "shards": SHARDS,
            "rows_per_shard": ROWS_PER_SHARD,
            "pmd_stats_cli_wall_seconds": round(cli_wall, 2),
            "pmd_stats_cli_cpu_seconds": round(cli_cpu, 2),
            "pmd_stats_cli_runs_wall_cpu": [[round(w, 2), round(c, 2)] for w, c in cli],
            "target_seconds": 2.0,
            "pmd_stats_codes_wall_cpu": [round(t, 2) for t in with_codes],
            "tar_path_wall_seconds_extrapolated": round(tar_wall, 1),
            "tar_path_cpu_seconds_extrapolated": round(tar_cpu, 1),
            "tar_path_measured_on_shards": len(tars),
            "speedup_wall": round(tar_wall / cli_wall, 1),
            "speedup_cpu": round(tar_cpu / cli_cpu, 1),
            "load_average_1min": os.getloadavg()[0],
            "what": (
                "`python -m pmd_pipeline.cli stats OUT --json` (process start and imports included) on 10,000 "
                "shards' stats/parquet/_dvae.json files, median of 3; vs opening tars and reading samples, "
                "captions, sizes and tokens from them (100 shards timed, scaled to 10,000); warm page cache. "
                "CPU seconds (user+sys) are the figure that does not depend on other load on a shared machine"
            ),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _time(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of fn() in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_cli(out: Path, *options: str) -> tuple[float, float]:
    """(wall, cpu) seconds of `pmd stats` as a user runs it, in its own process."""
    command = [sys.executable, "-m", "pmd_pipeline.cli", "stats", str(out), "--json", *options]
    wall, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    assert json.loads(proc.stdout)["total"]["shards"] == SHARDS
    return wall, cpu


# --- the synthetic build ------------------------------------------------------------------------


def make_build(out: Path, shards: int = SHARDS) -> Path:
    """Every shard gets its own stats json; parquet, tar and sidecar are hard links to one template per source
    (same bytes as distinct files would have; it keeps the 10,000-shard build small and quick to make)."""
    rng = np.random.default_rng(0)
    (out / "_plan").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    per_source = shards // len(SOURCES)
    for source in SOURCES:
        folder = out / source
        folder.mkdir()
        plan = {"shards": per_source, "rejected_raw_records": 3, "rejected_by_reason": {"wrong_column_count": 3}}
        (out / "_plan" / source).mkdir()
        (out / "_plan" / source / "_plan.json").write_text(json.dumps(plan))
        template = _template_shard(folder, source, rng)
        for i in range(per_source):
            name = f"{i:05d}"
            for suffix in (".tar", ".parquet", "_dvae.json"):
                if i:
                    os.link(folder / f"00000{suffix}", folder / f"{name}{suffix}")
            (folder / f"{name}_stats.json").write_text(json.dumps({**template, "shard": name}))
    return out


def _template_shard(folder: Path, source: str, rng) -> dict:
    written = ROWS_PER_SHARD - 30
    captions = [[_caption(rng) for _ in range(rng.integers(1, 4))] for _ in range(ROWS_PER_SHARD)]
    sizes = rng.integers(200, 1200, size=(ROWS_PER_SHARD, 2))
    status = ["written"] * written + ["failed"] * 20 + ["dropped"] * 10
    reason = [None] * written + ["http_404"] * 15 + ["timeout"] * 5 + ["too_few_words"] * 10
    frame = pl.DataFrame(
        {
            "key": [f"{source}_{i}" for i in range(ROWS_PER_SHARD)],
            "source": [source] * ROWS_PER_SHARD,
            "captions": captions,
            "kept_captions": captions,
            "status": status,
            "reason": reason,
            "original_width": sizes[:, 0].astype(np.int32),
            "original_height": sizes[:, 1].astype(np.int32),
            "image_bytes": rng.integers(6000, 20000, ROWS_PER_SHARD),
        }
    )
    frame.write_parquet(folder / "00000.parquet")
    codes = _write_tar(folder / "00000.tar", frame.head(written), rng)
    sidecar = {
        "codebook": "random, seed 0",
        "codebook_random": True,
        "samples_tokenized": written,
        "samples_failed": 0,
        "failure_reasons": {},
        "code_counts": np.bincount(codes, minlength=8192).tolist(),
        "tar_sha256": "0" * 64,
        "tar_bytes": (folder / "00000.tar").stat().st_size,
        "seconds": 1.0,
    }
    (folder / "00000_dvae.json").write_text(json.dumps(sidecar, indent=1))
    kept = frame.head(written)["kept_captions"]
    return {
        "source": source,
        "rows_in": ROWS_PER_SHARD,
        "samples_written": written,
        "pairs_written": int(kept.list.len().sum()),
        "caption_words": sum(len(c.split()) for cs in kept for c in cs),
        "rows_dropped": {"too_few_words": 10},
        "rows_failed": {"http_404": 15, "timeout": 5},
        "captions_in": int(frame["captions"].list.len().sum()),
        "captions_dropped": {},
        "fetch_attempted": ROWS_PER_SHARD - 10,
        "image_bytes": int(frame.head(written)["image_bytes"].sum()),
        "tar_bytes": (folder / "00000.tar").stat().st_size,
        "tar_sha256": "0" * 64,
    }


WORDS = "a the photo of dog cat red small city street near under old man woman child tree".split()


def _caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(3, 20)))


def _write_tar(path: Path, rows: pl.DataFrame, rng) -> np.ndarray:
    """Real samples: a 224x224 JPEG, caption, json and 14x14 uint16 tokens each."""
    codes = []
    with wds.TarWriter(str(path), encoder=False) as tar:
        for row in rows.iter_rows(named=True):
            tokens = rng.integers(0, 8192, size=(14, 14), dtype=np.uint16)
            codes.append(tokens.ravel())
            meta = {
                "captions": row["kept_captions"],
                "original_width": row["original_width"],
                "original_height": row["original_height"],
                "width": 224,
                "height": 224,
            }
            npy = io.BytesIO()
            np.save(npy, tokens)
            tar.write(
                {
                    "__key__": row["key"],
                    "jpg": _jpeg(rng),
                    "txt": row["kept_captions"][0].encode(),
                    "json": json.dumps(meta).encode(),
                    "dvae.npy": npy.getvalue(),
                }
            )
    return np.concatenate(codes)


def _jpeg(rng) -> bytes:
    gradient = np.linspace(0, 255, 224, dtype=np.float32)
    pixels = gradient[None, :, None] + rng.normal(0, 20, size=(224, 224, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --- the baseline: the same numbers from the tars -----------------------------------------------


def numbers_from_tars(tars: list[Path]) -> dict:
    """Samples, pairs, caption words, image sizes, bytes and code counts by opening every tar."""
    counts = Counter()
    words, widths, codes = [], [], np.zeros(8192, dtype=np.int64)
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    counts["samples"] += 1
                    counts["pairs"] += len(meta["captions"])
                    words += [len(c.split()) for c in meta["captions"]]
                    widths.append(meta["original_width"])
                elif member.name.endswith(".dvae.npy"):
                    codes += np.bincount(np.load(io.BytesIO(data)).ravel(), minlength=8192)
                elif member.name.endswith(".jpg"):
                    counts["image_bytes"] += len(data)
    return {**counts, "median_words": float(np.median(words)), "codes_used": int((codes > 0).sum())}
