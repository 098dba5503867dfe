"""Paths of one build's output: OUT/<source>/<NNNNN>.{tar,parquet,_stats.json}, the plan and the manifest.

A shard is the unit of work and of resume. Its `_stats.json` is written last, atomically: a shard
whose stats file exists is finished, and a finished shard is never rewritten.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")

# Extensions of a sample's members in a tar (KEY.<ext>).
IMAGE_EXT = "jpg"
TEXT_EXT = "txt"  # the first caption
JSON_EXT = "json"  # all captions, source, url, licence, original size, meta
TOKENS_EXT = "dvae.npy"  # uint16 [14, 14] DALL-E dVAE codebook indices of exactly the stored pixels

# NNNNN_dvae.json beside NNNNN.tar: written last by the tokenize stage (codebook, counts, the rewritten tar's hash).
SIDECAR_SUFFIX = "_dvae.json"


@dataclass(frozen=True)
class ShardPaths:
    out: Path
    source: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def folder(self) -> Path:
        return self.out / self.source

    @property
    def tar(self) -> Path:
        return self.folder / f"{self.name}.tar"

    @property
    def parquet(self) -> Path:
        return self.folder / f"{self.name}.parquet"

    @property
    def stats(self) -> Path:
        return self.folder / f"{self.name}_stats.json"

    @property
    def plan(self) -> Path:
        return plan_folder(self.out, self.source) / f"{self.name}.parquet"

    @property
    def work(self) -> Path:
        """Scratch space for this shard (img2dataset's own input and stats files); removed when done."""
        return self.out / "_work" / self.source / self.name

    def is_done(self) -> bool:
        return self.stats.exists()


def plan_folder(out: Path, source: str) -> Path:
    return out / "_plan" / source


def check_safe_name(name: str, what: str = "name") -> str:
    """Names from the data become file and tar member names: no dots, separators or traversal."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"unsafe {what} {name!r}: only letters, digits, '_' and '-' are allowed")
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; shards are meant to be read by others
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def temp_path_for(path: Path) -> Path:
    """A unique temporary name beside `path` (two attempts at the same shard never share one)."""
    return path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
