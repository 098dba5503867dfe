"""Crash points for the kill-and-resume tests: the build stops at a named point so a test can SIGKILL it there.

With PMD_PAUSE_AT=<point> in the environment, the first process to reach that point creates
OUT/_paused_at_<point> and sleeps; the test sees the file and kills the whole build. Without the
variable (every real run) a crash point is a dictionary lookup and nothing else.

Points: plan (a source's first plan part is written), fetch (a shard's first image arrived),
tokens_requested (a shard's images are fetched, its tokens not asked for yet), tokens (an actor holds a
shard's pixels), write_tar (a tar is complete under its temporary name), before_stats (tar, parquet and
`_dvae.json` are in place, the completion marker is not), manifest (every shard is finished, the manifest
is not written). The token pass over finished tars (`pmd tokenize OUT`): tokenize (a tokenized tar is
complete under its temporary name), tokenize_sidecar (it replaced the old one, its `_dvae.json` is not
written).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pmd_pipeline.storage import as_path, is_remote

PAUSE_ENV = "PMD_PAUSE_AT"


def crash_point(name: str, out: str | Path) -> None:
    if os.environ.get(PAUSE_ENV) != name:
        return
    marker = as_path(str(out)) / f"_paused_at_{name}"
    if is_remote(marker):  # a bucket has no exclusive create; two workers pausing at once is harmless here
        if marker.exists():
            return
        marker.write_bytes(b"")
        time.sleep(3600)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another worker is already paused here; one kill point per run is enough
    time.sleep(3600)
