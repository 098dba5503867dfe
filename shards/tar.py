"""The one deterministic tar writer of the format, and its reader.

Samples are written in the order given with fixed headers (owner pmd, mode 0444, mtime 0), so the same
samples give byte-identical tars, whichever stage writes them (the shard writer, the token rewrite).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import webdataset as wds

from shards.files import atomic_path, sha256_of
from shards.layout import TAR_MODE, TAR_OWNER


def write_tar(path: Path, samples: Iterable[dict], before_rename: Callable[[], None] = lambda: None) -> tuple[int, str]:
    """Write `samples` ({"__key__": key, ext: bytes}) to `path` atomically; returns (bytes, sha256)."""
    with atomic_path(path, before_rename) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=0, encoder=False) as tar:
                for sample in samples:
                    tar.write(sample)
        size, digest = tmp.stat().st_size, sha256_of(tmp)
    return size, digest


def read_samples(tar_path: Path) -> list[dict]:
    """The tar's samples in order, as {"__key__": key, ext: bytes}; keys hold no dots, so ext = after the first."""
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())
