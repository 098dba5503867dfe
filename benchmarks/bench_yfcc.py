"""YFCC metadata stage: parse + URL-decode + HTML strip + whitespace collapse + filters, vs the same rule
written row by row (benchmarks/yfcc_naive.py), with identical decisions; and peak memory at 200k vs 1M rows.

Input: the 1,000 real rows of ../shared/realdata/yfcc100m replicated (generated rows in the same format
when that folder is absent). Replication repeats texts, which flatters the pipeline's per-text langdetect
cache, so the ratio on the 1,000 distinct rows is reported as well.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from benchmarks import yfcc_naive

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "yfcc100m" / "yfcc100m_1k.tsv"
NAIVE_ROWS = 5_000  # the naive loop runs langdetect on every row: measured on a prefix, as rows/s


def base_rows() -> tuple[list[str], str]:
    if REAL.exists():
        return REAL.read_text(encoding="utf-8").splitlines(keepends=True), "real 1,000 rows"
    import random

    from pmd_pipeline.embedded.make_bundle import make_yfcc

    return make_yfcc(random.Random(0), []).splitlines(keepends=True), "generated rows (realdata absent)"


def write_replicated(rows: list[str], n: int, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(rows[i % len(rows)])
    return path


def pmd_stage(path: Path, keep: bool = True) -> pl.DataFrame | int:
    """The pipeline's metadata stage for one file: the source's reader and its filter chain, batch by batch.

    keep=False counts kept rows and lets each batch go, as the build does once a batch is written.
    """
    from filters import apply_filters, build_filters
    from filters.english import english_probability
    from pmd_pipeline.config import SourceConfig
    from sources import yfcc100m
    from sources.base import RejectLog

    english_probability.cache_clear()
    filters = build_filters(list(yfcc100m.DEFAULT_FILTERS))
    batches = yfcc100m.read(SourceConfig("yfcc100m", metadata=[str(path)]), RejectLog())
    if not keep:
        return sum(int(apply_filters(b, filters)["reason"].is_null().sum()) for b in batches)
    return pl.concat([apply_filters(b, filters).select("key", "kept_captions", "reason") for b in batches])


def decisions(frame: pl.DataFrame) -> list[tuple]:
    return [
        (r["key"].removeprefix("yfcc_"), (r["kept_captions"] or [None])[0], r["reason"])
        for r in frame.iter_rows(named=True)
    ]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def naive_stage(path: Path, limit: int) -> list[tuple]:
    with open(path, encoding="utf-8") as f:
        return [yfcc_naive.decide(line) for _, line in zip(range(limit), f, strict=False)]


def peak_rss_mb(path: Path) -> float:
    """Max RSS of a fresh process running the stage over `path` (the stage's memory, nothing else's)."""
    code = (
        "import resource, sys; from benchmarks.bench_yfcc import pmd_stage; from pathlib import Path; "
        "pmd_stage(Path(sys.argv[1]), keep=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def run() -> dict:
    rows, origin = base_rows()
    work = Path(tempfile.mkdtemp(prefix="bench_yfcc_"))
    distinct = write_replicated(rows, len(rows), work / "distinct.tsv")
    replicated = write_replicated(rows, 200_000, work / "200k.tsv")
    pmd_frame, pmd_s = timed(pmd_stage, replicated)
    naive, naive_s = timed(naive_stage, replicated, NAIVE_ROWS)
    assert decisions(pmd_frame)[:NAIVE_ROWS] == naive, "pipeline and row-by-row rule disagree"
    pmd_distinct, pmd_distinct_s = timed(pmd_stage, distinct)
    naive_distinct, naive_distinct_s = timed(naive_stage, distinct, len(rows))
    assert decisions(pmd_distinct) == naive_distinct
    million = write_replicated(rows, 1_000_000, work / "1m.tsv")
    memory = {"200k": peak_rss_mb(replicated), "1M": peak_rss_mb(million)}
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    pmd_rate, naive_rate = 200_000 / pmd_s, NAIVE_ROWS / naive_s
    return {
        "input": f"{origin}, replicated to 200,000",
        "pmd_rows_per_s": round(pmd_rate),
        "naive_rows_per_s": round(naive_rate),
        "ratio": round(pmd_rate / naive_rate, 1),
        "naive_measured_on": f"first {NAIVE_ROWS} rows (decisions asserted identical there)",
        "distinct_rows": {
            "rows": len(rows),
            "pmd_rows_per_s": round(len(rows) / pmd_distinct_s),
            "naive_rows_per_s": round(len(rows) / naive_distinct_s),
            "ratio": round(naive_distinct_s / pmd_distinct_s, 2),
        },
        "kept": int(pmd_frame["reason"].is_null().sum()),
        "peak_rss_mb": memory,
        "memory_ratio_1M_vs_200k": round(memory["1M"] / memory["200k"], 3),
        "cores_used": 1,
        "self_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
