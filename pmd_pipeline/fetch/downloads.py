"""Every file a config names by URL (metadata, `archive::member` metadata, image archives, `*_file` options) is
downloaded once into the output's storage before the plan stage, one Ray task per file, at most
`[fetch] download_parallelism` at a time, and the source configs the plan reads name the downloaded copies.

Where: OUT/_downloads/<host>/<path> of the URL as configured (the canonical one, not the mirror's), so a
file several sources name is downloaded once, and changing `--mirror` downloads nothing again. A path the
file system cannot take as is (a query string, odd characters, a port) goes under a `~<hash>` folder.

Resumable: the bytes arrive in `<target>.part` (with `<target>.part.json`: the URL, the server's ETag or
Last-Modified and the total size). A dropped connection is retried within the run from where it broke
(`Range: bytes=N-`, with `If-Range` so a file changed on the server starts again), with backoff; attempts
that got bytes never use up `[fetch] retries`, only attempts that got nothing do. A killed run leaves the
.part, and the next run continues it. A server that ignores Range (200 instead of 206) or answers another
range than the one asked is restarted from zero, cleanly.

Verified: the size against Content-Length or the Content-Range total, and `[sources.X] checksums`
(sha256 or md5 the publisher gives, by URL or file name) when set. A mismatch stops that file with one line
naming it, what was expected and what came, and the bytes are kept aside as `<target>.bad` (never used, never
deleted). The sha256, md5 and size of every file are recorded in `<target>.download.json` (written before the
file takes its name, so a file with its name is whole) and in the manifest.

OUT in a bucket: an object cannot be appended to, so the .part lives in this machine's scratch folder
(`storage.local_scratch`, resumed with Range as above) and the complete, verified file is uploaded in one
piece (s3fs uploads large files as one multipart upload that becomes visible when it completes): the object
appears whole, once. The tasks run on the driver's node (softly) so that a re-run finds its scratch .part;
that node's temporary folder needs room for the largest file.

Through the same guarded web layer as the images (`fetch.web`): `--mirror`, `--allow-host`, no private
addresses, per-request deadline until the headers (the body then has `timeout_s` per read, however long it is).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from pmd_pipeline.config import BuildConfig, FetchConfig, SourceConfig
from pmd_pipeline.errors import DiskFull, PmdError, StopBuild, is_disk_full
from pmd_pipeline.fetch.mirror import rewrite_url
from pmd_pipeline.fetch.web import GuardedOpener, WebError, WebPolicy, backoff_delay, is_retryable
from pmd_pipeline.storage import as_path, is_remote, local_scratch, upload, url_of
from shards.files import atomic_write_json, owned_path
from shards.layout import DOWNLOADS_FOLDER, PLAN_MARKER, plan_folder

PART_SUFFIX = ".part"
RECORD_SUFFIX = ".download.json"
BAD_SUFFIX = ".bad"
MEMBER_SEPARATOR = "::"
CHUNK = 1 << 20
CHECKSUM = re.compile(r"(sha256:[0-9a-f]{64}|md5:[0-9a-f]{32})")
_SAFE = re.compile(r"[^A-Za-z0-9._+=@,-]")
_OUR_SUFFIXES = (PART_SUFFIX, f"{PART_SUFFIX}.json", RECORD_SUFFIX, BAD_SUFFIX)


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def split_member(entry: str) -> tuple[str, str | None]:
    """`https://h/caption_datasets.zip::dataset_coco.json` -> (the archive's URL, the member); (entry, None)
    without a member. A `::` in the host (`http://[::1]/`) is not a separator: only one after the host is."""
    scheme = entry.find("://")
    start = entry.find("/", scheme + 3) if scheme >= 0 else 0
    at = entry.find(MEMBER_SEPARATOR, start) if start >= 0 else -1
    return (entry, None) if at < 0 else (entry[:at], entry[at + len(MEMBER_SEPARATOR) :])


def file_name(url: str) -> str:
    return PurePosixPath(urlsplit(url).path).name or urlsplit(url).netloc


@dataclasses.dataclass(frozen=True)
class Download:
    url: str  # as configured (the mirror rewrites it when fetched)
    path: str  # where it goes, relative to OUT: _downloads/<host>/<path> (relative_target)
    expected: str = ""  # "sha256:<hex>" or "md5:<hex>", lower case; "" when the publisher gives none
    sources: tuple[str, ...] = ()  # the sources that need it

    @property
    def name(self) -> str:
        return file_name(self.url)


# --- what a config downloads, and where it goes ---


def source_urls(source_cfg: SourceConfig) -> list[str]:
    """The URLs a source names (archives without their `::member`), in config order, each once."""
    entries = [*source_cfg.metadata, *source_cfg.images.values()]
    entries += [v for k, v in source_cfg.options.items() if k.endswith("_file") and isinstance(v, str)]
    return list(dict.fromkeys(split_member(e)[0] for e in entries if is_url(e)))


def target_for(out: Path, url: str) -> Path:
    return out.joinpath(*relative_target(url).parts)


def relative_target(url: str) -> PurePosixPath:
    """_downloads/<host>/<path>; under a `~<hash of the URL>` folder when the path had to be changed."""
    parts = urlsplit(url)
    host = (parts.hostname or "host").lower()
    changed = bool(parts.query) or bool(_SAFE.search(host))
    folder = _SAFE.sub("_", host) + (f"_{parts.port}" if parts.port else "")
    names = []
    for segment in (s for s in parts.path.split("/") if s):
        safe = _SAFE.sub("_", segment)
        if safe in (".", ".."):
            safe = "_" * len(safe)
        changed |= safe != segment
        names.append(safe)
    names = names or ["index"]
    changed |= names[-1].endswith(_OUR_SUFFIXES)
    if changed:
        names.insert(len(names) - 1, "~" + hashlib.sha256(url.encode()).hexdigest()[:12])
    return PurePosixPath(DOWNLOADS_FOLDER, folder, *names)


def expected_checksum(source_cfg: SourceConfig, url: str) -> str:
    """The source's checksum for `url`, given by the URL or by its file name; "" when none."""
    value = source_cfg.checksums.get(url) or source_cfg.checksums.get(file_name(url)) or ""
    return value.strip().lower()


def check_checksums(source_cfg: SourceConfig) -> None:
    """Each checksum is `sha256:<64 hex>` or `md5:<32 hex>` and names one of the source's URLs (or its file
    name): a misspelt key would otherwise verify nothing, silently."""
    urls = source_urls(source_cfg)
    names = {file_name(u) for u in urls}
    for key, value in source_cfg.checksums.items():
        where = f"config [sources.{source_cfg.name}] checksums"
        if not CHECKSUM.fullmatch(value.strip().lower()):
            wanted = '"sha256:<64 hex digits>" or "md5:<32 hex digits>"'
            raise PmdError(f'{where}: "{key}" = "{value[:80]}" is not {wanted}')
        if key not in urls and key not in names:
            downloads = ", ".join(names) or "none (this source names no URL)"
            raise PmdError(f'{where}: "{key}" is not a file this source downloads ({downloads})')


def downloads_of(cfg: BuildConfig, sources: list[SourceConfig] | None = None) -> list[Download]:
    """The files `sources` (default: the enabled ones) need downloaded, each once; a planned source needs its
    image archives only (its metadata was read when it was planned)."""
    out = as_path(cfg.out)
    jobs: dict[str, Download] = {}
    for source_cfg in cfg.enabled_sources() if sources is None else sources:
        planned = owned_path(out, plan_folder(out, source_cfg.name) / PLAN_MARKER).exists()
        needed = source_urls(dataclasses.replace(source_cfg, metadata=[], options={})) if planned else None
        for url in source_urls(source_cfg) if needed is None else needed:
            expected = expected_checksum(source_cfg, url)
            job = jobs.get(url) or Download(url, str(relative_target(url)), expected)
            if expected and job.expected and expected != job.expected:
                names = f"{', '.join(job.sources)} and {source_cfg.name}"
                raise PmdError(f"config: sources {names} give {url} different checksums")
            sources_so_far = (*job.sources, source_cfg.name)
            jobs[url] = dataclasses.replace(job, expected=job.expected or expected, sources=sources_so_far)
    return list(jobs.values())


def localized(cfg: BuildConfig, source_cfg: SourceConfig) -> SourceConfig:
    """The source config with every URL replaced by its download's path (`archive::member` keeps its member)."""
    out = as_path(cfg.out)

    def local(entry):
        if not isinstance(entry, str) or not is_url(entry):
            return entry
        url, member = split_member(entry)
        path = url_of(target_for(out, url))
        return path if member is None else f"{path}{MEMBER_SEPARATOR}{member}"

    return dataclasses.replace(
        source_cfg,
        metadata=[local(m) for m in source_cfg.metadata],
        images={role: local(v) for role, v in source_cfg.images.items()},
        options={k: local(v) if k.endswith("_file") else v for k, v in source_cfg.options.items()},
    )


def records(cfg: BuildConfig) -> dict[str, dict]:
    """{URL: its download record (file, size, sha256, md5, checked)} of every URL the config names that has
    been downloaded: the manifest's `downloads`."""
    out = as_path(cfg.out)
    found = {}
    for source_cfg in cfg.enabled_sources():
        for url in source_urls(source_cfg):
            record = _read_record(_record_path(target_for(out, url)))
            if record is not None:
                found[url] = record
    return found


# --- one file ---


def download_file(job: Download, fetch: FetchConfig, out: str, on_bytes: Callable[[int], None] | None = None) -> dict:
    """Download `job` into OUT, resuming its partial file, verify it and record it; returns the record (with
    `downloaded`: False when the file was already there). PmdError, naming the file, when it cannot be had."""
    out_path = as_path(out)
    target = owned_path(out_path, out_path.joinpath(*PurePosixPath(job.path).parts))
    started = time.monotonic()
    done = _already_there(job, out_path, target)
    if done is not None:
        return {**done, "downloaded": False, "seconds": 0.0}
    relative = PurePosixPath(job.path)
    partial = _Partial(local_scratch(out_path, *relative.parent.parts, relative.name + PART_SUFFIX), out_path)
    try:
        total = _fetch(job, partial, fetch, on_bytes or (lambda n: None))
        record = _finish(job, partial, total, out_path, target)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFull(f"no space left on the device downloading {job.name} into {partial.path}: {err}") from None
        raise PmdError(f"could not download {job.name}: {type(err).__name__}: {err}") from None
    return {**record, "downloaded": True, "seconds": round(time.monotonic() - started, 3)}


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + RECORD_SUFFIX)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _size_of(path: Path) -> int | None:
    try:
        return path.fs.size(path.path) if is_remote(path) else os.path.getsize(path)
    except (OSError, FileNotFoundError):
        return None


def _already_there(job: Download, out: Path, target: Path) -> dict | None:
    """The record of a file an earlier run downloaded whole (its record, then its name); checked against a
    checksum the config may have gained since."""
    record = _read_record(_record_path(target))
    if record is None or record.get("url") != job.url or _size_of(target) != record.get("size"):
        return None
    if job.expected and _got(job.expected, record) != job.expected.split(":", 1)[1]:
        bad = _set_aside(target, out)
        _record_path(target).unlink(missing_ok=True)
        raise PmdError(_mismatch(job, _got(job.expected, record), bad))
    return {**record, "checked": job.expected or None}


def _fetch(job: Download, partial: _Partial, fetch: FetchConfig, on_bytes) -> int | None:
    """Bring partial up to the whole file; the total size the server declared (None if it never said)."""
    policy = WebPolicy.from_config(fetch)
    opener = GuardedOpener(policy)
    url = rewrite_url(job.url, fetch.mirror)
    failures = 0  # attempts in a row that got no byte
    while True:
        before, received = partial.size(), partial.received
        try:
            return _attempt(opener, url, job, partial, on_bytes)
        except urllib.error.HTTPError as err:
            err.close()
            complete = _unsatisfiable_total(err)
            if complete is not None and complete == before and complete > 0:
                return complete  # the .part was whole already (killed before it took its name)
            if err.code == 416:
                partial.reset()
            elif not is_retryable(err):
                missing = err.code in (404, 410)
                raise PmdError(_failed(job, url, f"HTTP {err.code} {err.reason}", fetch, missing)) from None
            error: Exception = err
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, OSError) and is_disk_full(err):
                raise
            if not is_retryable(err):
                raise PmdError(_failed(job, url, _why(err), fetch)) from None
            error = err
        if partial.received > received:
            delay = backoff_delay(policy, 0, error)  # it was getting somewhere: go on from where it broke
            failures = 0
        else:
            failures += 1
            if failures > fetch.retries:
                raise PmdError(_failed(job, url, f"{_why(error)} (after {failures} attempts)", fetch))
            delay = backoff_delay(policy, failures - 1, error)
        time.sleep(delay)


def _attempt(opener: GuardedOpener, url: str, job: Download, partial: _Partial, on_bytes) -> int | None:
    """One request from partial's size on; returns the total once the file is whole, raises when cut short."""
    offset, state = partial.size(), partial.state()
    if offset and (state is None or state.get("url") != job.url):
        partial.reset()  # bytes of unknown origin: start again
        offset, state = 0, None
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]  # the server sends all of it if the file changed meanwhile
    with opener.stream(urllib.request.Request(url, headers=headers)) as response:
        _refuse_encoding(response, job)
        total = _total(response)
        if response.status == 206:
            first = _range_start(response)
            if first != offset or (state and state.get("total") not in (None, total)):
                partial.reset()
                raise WebError("range_mismatch", f"asked for bytes {offset}-, got {first} of {total}", retryable=True)
        elif offset:  # 200: the server ignored the Range, or If-Range found a newer file: from zero, cleanly
            partial.reset()
            offset = 0
        if offset == 0:
            partial.start({"url": job.url, "validator": _validator(response), "total": total})
        partial.catch_up()
        partial.append(response, on_bytes)
    size = partial.size()
    if total is not None and size < total:
        raise WebError("truncated_body", f"the connection closed at byte {size:,} of {total:,}", retryable=True)
    if total is not None and size > total:
        partial.reset()
        raise WebError("body_too_long", f"{size:,} bytes where the server declared {total:,}", retryable=True)
    return total


def _finish(job: Download, partial: _Partial, total: int | None, out: Path, target: Path) -> dict:
    """Verify the whole .part; record it, then give it its name (a local rename, or one upload to a bucket)."""
    partial.catch_up()
    size, sha256, md5 = partial.size(), partial.sha256.hexdigest(), partial.md5.hexdigest()
    problem = None
    if total is not None and size != total:
        problem = f"size mismatch: expected {total:,} bytes, got {size:,}"
    elif job.expected:
        algorithm, want = job.expected.split(":", 1)
        got = sha256 if algorithm == "sha256" else md5
        if got != want:
            problem = f"{algorithm} mismatch: expected {want}, got {got}"
    if problem:
        bad = partial.set_aside(target)
        raise PmdError(f"download {job.name} ({job.url}): {problem}; the file is kept aside as {bad} and not used")
    record = {"url": job.url, "file": job.path, "size": size, "sha256": sha256, "md5": md5}
    record["checked"] = job.expected or None
    atomic_write_json(_record_path(target), record, within=out)
    partial.finish(target)
    return record


def _got(expected: str, record: dict) -> str:
    return record.get(expected.split(":", 1)[0], "")


def _mismatch(job: Download, got: str, bad: str) -> str:
    algorithm, want = job.expected.split(":", 1)
    return (
        f"download {job.name} ({job.url}): {algorithm} mismatch: expected {want}, got {got}; "
        f"the file is kept aside as {bad} and not used"
    )


def _set_aside(target: Path, out: Path) -> str:
    bad = target.with_name(target.name + BAD_SUFFIX)
    owned_path(out, bad)
    if is_remote(target):
        target.fs.mv(target.path, bad.path)
    else:
        os.replace(target, bad)
    return url_of(bad)


def _failed(job: Download, url: str, why: str, fetch: FetchConfig, missing: bool = False) -> str:
    """One line naming the file, the URL tried and why; with a mirror, that it was the mirror's copy."""
    where = ""
    if fetch.mirror and url != job.url:
        where = f"the mirror {fetch.mirror} has no copy of {job.url}" if missing else f"the mirror's copy of {job.url}"
        where = f" ({where})"
    return f"could not download {job.name} from {url}: {why}{where}"


def _why(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, Exception):
        return _why(err.reason)
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refuse_encoding(response, job: Download) -> None:
    """We ask for identity. A .gz file served with Content-Encoding gzip is the file's own bytes, saved as they
    are; any other encoding would save bytes that are not the file."""
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity" or (encoding in ("gzip", "x-gzip") and job.name.endswith((".gz", ".tgz"))):
        return
    raise WebError("content_encoding_refused", f"Content-Encoding {encoding[:40]} (we ask for identity)")


def _total(response) -> int | None:
    if response.status == 206:
        total = (response.headers.get("Content-Range") or "").rpartition("/")[2].strip()
        return int(total) if total.isdigit() else None
    length = (response.headers.get("Content-Length") or "").strip()
    return int(length) if length.isdigit() else None


def _range_start(response) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range") or "")
    return int(match[1]) if match else None


def _unsatisfiable_total(err: urllib.error.HTTPError) -> int | None:
    """416's `Content-Range: bytes */N`: the file has N bytes."""
    if err.code != 416 or err.headers is None:
        return None
    total = (err.headers.get("Content-Range") or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _validator(response) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified."""
    etag = (response.headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return (response.headers.get("Last-Modified") or "").strip() or None


class _Partial:
    """A download's bytes so far: a local file appended to, its state beside it, and running hashes of it."""

    def __init__(self, path: Path, out: Path):
        self.path = owned_path(out, path)
        self.state_path = owned_path(out, path.with_name(path.name + ".json"))
        self.out = out
        self.received = 0  # bytes appended by this process: an attempt that added some was getting somewhere
        self._reset_hashes()

    def _reset_hashes(self) -> None:
        self.sha256, self.md5, self.hashed = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def start(self, state: dict) -> None:
        """A fresh download: its state first, then an empty .part (a .part never exists without its state)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._reset_hashes()
        atomic_write_json(self.state_path, state, within=self.out)
        self.path.touch()

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        self._reset_hashes()

    def catch_up(self) -> None:
        """The hashes cover exactly the bytes on disk (re-read after a resume, or a write cut short)."""
        if self.hashed == self.size():
            return
        self._reset_hashes()
        with open(self.path, "rb") as f:
            while block := f.read(CHUNK):
                self._hash(block)

    def append(self, response, on_bytes) -> None:
        with open(self.path, "ab") as f:
            while chunk := response.read1(CHUNK):
                f.write(chunk)
                self._hash(chunk)
                self.received += len(chunk)
                on_bytes(len(chunk))

    def _hash(self, block: bytes) -> None:
        self.sha256.update(block)
        self.md5.update(block)
        self.hashed += len(block)

    def set_aside(self, target: Path) -> str:
        """The bad bytes, kept where a person can look at them, under the name `<target>.bad`."""
        bad = self.path.with_name(target.name + BAD_SUFFIX)
        os.replace(self.path, bad)
        self.state_path.unlink(missing_ok=True)
        return url_of(bad)

    def finish(self, target: Path) -> None:
        if is_remote(target):
            upload(self.path, target)  # one object, visible when its upload completes
            self.path.unlink(missing_ok=True)
        else:
            with open(self.path, "rb+") as f:
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(self.path, target)
        self.state_path.unlink(missing_ok=True)


# --- all of them, as Ray tasks ---


def download_all(cfg: BuildConfig, sources: list[SourceConfig], counter=None, on_wait=lambda: None) -> dict[str, str]:
    """Download every file `sources` need, one Ray task each, at most `[fetch] download_parallelism` at a time.

    Returns {source: why} for the sources a download failed for (they fail alone; the rest go on). A full
    device or a link in OUT (StopBuild) stops everything at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    jobs = downloads_of(cfg, sources)
    if not jobs:
        return {}
    if counter is not None:
        counter.set_totals.remote(downloads=len(jobs))
        counter.add.remote("download", {})  # the stage's clock starts now
    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=True)  # a bucket's .part is in this node's scratch
    task = _remote_task().options(scheduling_strategy=strategy)
    queue, in_flight, failed = list(reversed(jobs)), {}, {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < cfg.fetch.download_parallelism:
                job = queue.pop()
                in_flight[task.remote(job, cfg.fetch, cfg.out, counter)] = job
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            on_wait()
            for ref in ready:
                job = in_flight.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as err:
                    value = PmdError(f"could not download {job.name}: {str(err).strip().splitlines()[-1]}")
                if isinstance(value, StopBuild):
                    raise value
                if isinstance(value, PmdError):
                    for source in job.sources:
                        failed.setdefault(source, str(value))
    except BaseException:  # stopped: no download of this run goes on writing
        for ref in in_flight:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished, or its worker already gone
                pass
        raise
    return failed


@functools.cache
def _remote_task():
    """The Ray task (made on first use: reading a config needs no Ray). No CPU reserved: a download waits on
    the network, and the driver's limit (download_parallelism) bounds how many run."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(_download_task)


def _download_task(job: Download, fetch: FetchConfig, out: str, counter):
    """One file; errors come back as values (PmdError, StopBuild), so the driver tells them from a crash."""
    from pmd_pipeline.progress import Reporter

    progress = Reporter(counter, "download")
    try:
        record = download_file(job, fetch, out, on_bytes=lambda n: progress.add(bytes=n))
        progress.add(shards=1)
        return record
    except PmdError as err:
        progress.add(failed=1)
        return err
    except Exception as err:
        progress.add(failed=1)
        if is_disk_full(err):
            return DiskFull(f"no space left on the device downloading {job.name}: {err}")
        return PmdError(f"could not download {job.name}: {_why(err)}")
    finally:
        progress.flush()
