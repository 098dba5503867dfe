"""The one deterministic tar writer of the format, and its readers (whole tars, and streams from any URL).

Samples are written in the order given with fixed headers (owner pmd, mode 0444, mtime 0), so the same
samples give byte-identical tars, whichever stage writes them (the shard writer, the token rewrite).
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import webdataset as wds

from pmd_pipeline.storage import as_path
from shards.files import atomic_path, sha256_of
from shards.layout import TAR_MODE, TAR_OWNER


def write_tar(
    path: Path, samples: Iterable[dict], before_rename: Callable[[], None] = lambda: None, within: Path | None = None
) -> tuple[int, str]:
    """Write `samples` ({"__key__": key, ext: bytes}) to `path` atomically; returns (bytes, sha256).

    `within`: the build's OUT, which `path` must lie in with no link on the way (shards.files.owned_path).
    """
    with atomic_path(path, before_rename, within=within) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=0, encoder=False) as tar:
                for sample in samples:
                    tar.write(sample)
        size, digest = tmp.stat().st_size, sha256_of(tmp)
    return size, digest


def read_samples(tar_path: Path) -> list[dict]:
    """The tar's samples in order, as {"__key__": key, ext: bytes}; keys hold no dots, so ext = after the first."""
    samples: dict[str, dict] = {}
    with tar_path.open("rb") as f, tarfile.open(fileobj=f) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


SHARD_READ_ATTEMPTS = 3


def shard_samples(urls: list[str]) -> Iterator[dict]:
    """The samples of each shard in turn, streamed (no local copy): a local path, any fsspec URL (s3://, gs://,
    http(s)://) or an open_clip-style `pipe:COMMAND`.

    A connection broken mid-shard is retried from where it broke (the samples already read are skipped);
    a shard still unreadable after SHARD_READ_ATTEMPTS is left out and counted as `shard_unreadable`, so
    one bad object never stops a run.
    """
    for url in urls:
        yield from _one_shard(url)


def _one_shard(url: str) -> Iterator[dict]:
    done = 0
    for attempt in range(SHARD_READ_ATTEMPTS):
        try:
            with _open_shard(url) as stream:
                for index, sample in enumerate(_tar_samples(url, stream)):
                    if index >= done:
                        done += 1
                        yield sample
            return
        except Exception as err:  # OSError, tarfile.TarError, aiohttp's and botocore's own: any broken read
            if attempt + 1 == SHARD_READ_ATTEMPTS:
                yield {"__error__": "shard_unreadable", "__detail__": f"{url}: {type(err).__name__}: {err}"}
            else:
                time.sleep(0.5 * 2**attempt)


def _open_shard(url: str):
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    return as_path(url).open("rb")


def _tar_samples(url: str, stream) -> Iterator[dict]:
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
    return wds.tariterators.group_by_keys(files)
