"""Writing a file so that readers see it whole or not at all.

Locally: a temporary name beside it, fsync, rename. On an object store (no rename): a local temporary
file, uploaded in one piece when complete, so the object appears whole or not at all. Every file of a
build (tars, parquets, stats, sidecars, plans, manifest, downloads) is written this way, so a killed run
leaves at most a `.NAME.*.tmp` file beside a local target, which the next attempt at that shard removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pmd_pipeline.storage import is_remote, upload


def temp_path_for(path: Path) -> Path:
    """A unique temporary name beside `path` (two attempts at the same shard never share one)."""
    return path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def remove_temp_files(folder: Path, name_prefix: str) -> None:
    """Remove the temporary files of killed attempts at files whose names start with `name_prefix`.

    An object store never holds them (temporary files are local), so there is nothing to list there."""
    if is_remote(folder):
        return
    for tmp in folder.glob(f".{name_prefix}*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path, before_rename: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`, else remove it.

    `before_rename` runs with the complete temporary file in place (the crash points use it).
    """
    if is_remote(path):
        with _uploaded(path, before_rename) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o644)  # shards are meant to be read by others, whatever made the file
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _uploaded(path: Path, before_upload: Callable[[], None]) -> Iterator[Path]:
    """A local temporary file for `path`; uploaded whole once written, removed either way."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        before_upload()
        upload(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    if is_remote(path):  # one PUT of the bytes: the object appears whole, and no temporary file is needed
        path.fs.pipe_file(path.path, data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
