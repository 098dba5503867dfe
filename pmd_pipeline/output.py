"""The output folder belongs to one config: claim it (or refuse), hash what decides its content, read it back."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pmd_pipeline.config import BuildConfig
from pmd_pipeline.config_file import config_from_dict
from pmd_pipeline.errors import DiskFull, PmdError, is_disk_full
from pmd_pipeline.process import filter_chain
from pmd_pipeline.storage import as_path, is_remote, list_names, local_scratch, url_of
from shards.files import atomic_write_json, owned_path
from shards.layout import (
    CONFIG_FILE,
    DOWNLOADS_FOLDER,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    REJECTS_FILE,
    WORK_FOLDER,
    finished_shards,
    plan_folder,
)


def content_hash(cfg: BuildConfig) -> str:
    """Hash of everything that decides what the shards contain (not how fast or from which mirror)."""
    content = {
        "format_version": FORMAT_VERSION,
        "shard_size": cfg.shard_size,
        "sources": [_source_content(s) for s in cfg.enabled_sources()],
        "filters": [dataclasses.asdict(f) for f in cfg.filters],
        "filter_chains": _filter_chains(cfg),
        "image": dataclasses.asdict(cfg.image),
    }
    blob = json.dumps(content, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _source_content(source) -> dict:
    """A source's config as it decides content: its checksums only verify the files it names, so adding one to
    a config (or a build made before checksums existed) keeps the output's hash."""
    fields = dataclasses.asdict(source)
    fields.pop("checksums", None)
    return fields


def _filter_chains(cfg: BuildConfig) -> dict:
    """Each source's resolved chain: a source's built-in default decides content as much as the config."""
    return {s.name: [dataclasses.asdict(f) for f in filter_chain(cfg, s.name)] for s in cfg.enabled_sources()}


def claim_output(cfg: BuildConfig) -> Path:
    """Create OUT and save the resolved config; an OUT made by a different config is never touched."""
    out = as_path(cfg.out)
    check_output_folder(out)
    saved = out / CONFIG_FILE
    if saved.exists():
        previous = _read_hash(saved)
        if previous != content_hash(cfg):
            raise PmdError(
                f"{out} was built with a different config (hash {previous}, this one {content_hash(cfg)}); "
                "use another --out, or delete that folder to rebuild it"
            )
    else:
        _refuse_foreign(out)
    refuse_links(cfg)
    with _writable(out):
        if not is_remote(out):  # a bucket has no folders: OUT appears with its first object
            out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved, {"config_hash": content_hash(cfg), "config": cfg.to_dict()}, within=out)
    return out


def check_output_folder(out: Path) -> None:
    """A local OUT is a folder, or can be made one: else one line saying why (not mkdir's traceback)."""
    if is_remote(out):
        return  # a bucket prefix is never a file in the way; cli's check_writable probes it
    if out.is_symlink() and not out.exists():
        raise PmdError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise PmdError(f"--out {out} is a file, not a folder; give a new folder or an earlier build's output")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PmdError(f"--out {out} cannot be made: {parent} is a file, not a folder")
            return


def _refuse_foreign(out: Path) -> None:
    """A folder holding anything but our lock file, and no config.json, is someone else's: never written into."""
    if any(name != LOCK_FILE for name in list_names(out)):
        raise PmdError(f"{out} exists and is not a pmd build output; choose another --out")


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """Hold OUT/.pmd.lock for the whole run: a second `pmd build` or `pmd tokenize` of the same OUT is refused.

    fcntl.flock: the kernel releases the lock when the process ends, however it ends (SIGKILL included), so
    a killed run never leaves OUT locked; the file stays, meaning nothing by itself, and is never deleted
    (deleting it would let two runs lock two different files). This serves local folders (and NFS, where
    Linux maps flock to POSIX locks). An object store has no flock: OUT in a bucket is not locked yet and
    needs its own lease (e.g. an object written with a conditional put, renewed while the run lives).
    """
    if is_remote(out):
        yield
        return
    check_output_folder(out)
    if not (out / CONFIG_FILE).exists():
        _refuse_foreign(out)  # before the lock file is made in someone else's folder
    with _writable(out):
        out.mkdir(parents=True, exist_ok=True)
        owned_path(out, out / LOCK_FILE)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise PmdError(
                f"{out} is in use by another pmd run (pid {holder}); wait for it to finish or stop it "
                "(a stopped build resumes when re-run), or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _writable(out: Path) -> Iterator[None]:
    """An OSError making or writing OUT (read-only, no permission, full) becomes one line."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(out) from None
        raise PmdError(
            f"cannot write to the output folder {out}: {err.strerror or err} ({err.filename or out}); "
            "choose another --out or make it writable"
        ) from None


def refuse_links(cfg: BuildConfig) -> None:
    """Refuse, before any work, a symbolic link where the build keeps its own folders and files (owned_path).

    Every delete and overwrite checks its own path again; this makes the common case one line at the start.
    """
    out = as_path(cfg.out)
    owned = [out / CONFIG_FILE, out / MANIFEST_FILE, out / LOCK_FILE, local_scratch(out, WORK_FOLDER)]
    owned += [out / DOWNLOADS_FOLDER, local_scratch(out, DOWNLOADS_FOLDER)]
    for source in cfg.enabled_sources():
        owned += [plan_folder(out, source.name), out / source.name / REJECTS_FILE]
    for path in owned:
        owned_path(out, path)


def disk_full_error(out: Path) -> DiskFull:
    """The one message of a full device: where, how much the build holds there, and that a re-run resumes.

    For OUT in a bucket the device that filled is this machine's: temporary files and scratch folders."""
    out = as_path(out)
    if is_remote(out):
        scratch = Path(tempfile.gettempdir())
        return DiskFull(
            f"this machine's temporary folder {scratch} is full ({_free(scratch)} free) while building {url_of(out)}; "
            "free some space there (or point TMPDIR at a larger disk) and re-run the same command: it resumes "
            f"from the {len(finished_shards(out))} finished shards"
        )
    finished = len(finished_shards(out)) if out.is_dir() else 0
    return DiskFull(
        f"the output device is full (no space left writing {out}): {_size(_bytes_under(out))} written there, "
        f"{finished} shards finished and kept, {_free(out)} free. Free some space (or move OUT to a larger disk) "
        "and re-run the same command: it resumes from the finished shards"
    )


def _free(folder: Path) -> str:
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "?"


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _read_hash(saved: Path) -> str | None:
    try:
        return json.loads(saved.read_text())["config_hash"]
    except (OSError, ValueError, KeyError):
        raise PmdError(f"{saved} is unreadable; delete the output folder or choose another --out") from None


def saved_config(out: Path) -> BuildConfig:
    """The config a build folder was made with (OUT/config.json), as a BuildConfig."""
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise PmdError(f"{out} is not a pmd build output (no readable {CONFIG_FILE})") from None
    saved["sources"] = {s.pop("name"): s for s in saved["sources"]}
    saved["filters"] = [{"name": f["name"], **f["params"]} for f in saved["filters"]]
    saved["out"] = url_of(out) if is_remote(out) else str(out.resolve())
    return config_from_dict(saved, base_dir=Path.cwd() if is_remote(out) else out.resolve())


def save_tokenize_settings(cfg: BuildConfig) -> None:
    """Record the codebook and precision a `pmd tokenize` used, so the manifest and a later build see them."""
    path = as_path(cfg.out) / CONFIG_FILE
    saved = json.loads(path.read_text())
    saved["config"]["tokenize"] = cfg.to_dict()["tokenize"]
    with _writable(as_path(cfg.out)):
        atomic_write_json(path, saved, within=as_path(cfg.out))
