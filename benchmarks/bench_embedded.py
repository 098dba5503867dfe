"""Wall time of `pmd build` on the embedded default, as a user runs it (CLI, Ray start included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run() -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_embedded_")) / "pmd_out"
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pmd_pipeline.cli", "build", "--out", str(out), "--no-tokenize"],
        capture_output=True,
        text=True,
    )
    elapsed = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "seconds": round(elapsed, 1),
        "what": "pmd build --no-tokenize on the embedded default, fresh output, CLI + Ray start (tokens: bench dvae)",
    }
