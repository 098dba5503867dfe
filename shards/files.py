"""Writing a file so that readers see it whole or not at all.

Locally: a temporary name beside it, fsync, rename. On an object store (no rename): a local temporary
file, uploaded in one piece when complete, so the object appears whole or not at all. Every file of a
build (tars, parquets, stats, sidecars, plans, manifest, downloads) is written this way, so a killed run
leaves at most a `.NAME.*.tmp` file beside a local target, which the next attempt at that shard removes.

Nothing a build deletes or overwrites may lie outside OUT: every delete and every overwrite of a build checks
its path with `owned_path` (atomic writes take `within=OUT`), which refuses a symbolic link below OUT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pmd_pipeline.errors import StopBuild
from pmd_pipeline.storage import is_remote, local_scratch, upload, url_of


def owned_path(out: Path, path: Path) -> Path:
    """`path`, when a build may delete or overwrite it: below OUT, and no symbolic link from OUT down to it.

    A link inside OUT (OUT/_work -> /scratch, OUT/coco/_rejects.jsonl -> ~/notes) would send a resume's
    deletes and overwrites to what it points at, outside OUT: refused (StopBuild) instead. OUT itself may be
    a link (a folder on another disk); only what lies below it is the build's own. For OUT in a bucket the
    local root is its scratch folder (`local_scratch`), and an object's key must lie under OUT's prefix
    (object stores have no links).
    """
    if is_remote(path):
        base = url_of(out).rstrip("/")
        if not url_of(path).startswith(f"{base}/"):
            raise StopBuild(f"{url_of(path)} is outside the output {base}: a build writes inside it only")
        return path
    root = Path(os.path.abspath(local_scratch(out)))
    target = Path(os.path.abspath(path))  # lexical: no link is followed here
    try:
        parts = target.relative_to(root).parts
    except ValueError:
        raise StopBuild(f"{path} is outside the output folder {root}: a build writes inside it only") from None
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # nothing below exists yet: the build makes it, as a plain folder or file
        if stat.S_ISLNK(mode):
            raise StopBuild(
                f"{current} is a symbolic link (to {os.readlink(current)}), where the build keeps its own files: "
                f"it would delete or overwrite what the link points to, outside {root}. Remove the link "
                "(move what it points to elsewhere first if you need it) and re-run, or choose another --out"
            )
    return path


def temp_path_for(path: Path) -> Path:
    """A unique temporary name beside `path` (two attempts at the same shard never share one)."""
    return path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def remove_temp_files(folder: Path, name_prefix: str, within: Path) -> None:
    """Remove the temporary files of killed attempts at files whose names start with `name_prefix`.

    An object store never holds them (temporary files are local), so there is nothing to list there."""
    if is_remote(folder):
        return
    for tmp in owned_path(within, folder).glob(f".{name_prefix}*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(
    path: Path, before_rename: Callable[[], None] = lambda: None, within: Path | None = None
) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`, else remove it.

    `before_rename` runs with the complete temporary file in place (the crash points use it). `within`: the
    build's OUT, which `path` must lie in with no link on the way (`owned_path`); every file of a build passes it.
    """
    if within is not None:
        owned_path(within, path)
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


def atomic_write_bytes(path: Path, data: bytes, within: Path | None = None) -> None:
    if is_remote(path):  # one PUT of the bytes: the object appears whole, and no temporary file is needed
        path.fs.pipe_file(path.path, data)
        return
    with atomic_path(path, within=within) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj, within: Path | None = None) -> None:
    blob = (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
    atomic_write_bytes(path, blob, within=within)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
