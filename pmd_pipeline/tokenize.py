"""Tokenize one finished shard: add KEY.dvae.npy to every image sample, atomically, then write NNNNN_dvae.json last.

The tar is rewritten under a temporary name and renamed over the old one; the `_dvae.json` sidecar,
written after the rename, marks the shard tokenized. A shard killed half-way has no sidecar (and at most
a stray temporary file, removed on the next attempt), so it is simply redone. A sidecar from another
codebook is never overwritten without `force`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds

from pmd_pipeline.codebook import VOCAB_SIZE
from pmd_pipeline.dvae import BadImage, DvaeTokenizer, encoder_pixels, token_problem
from pmd_pipeline.errors import PmdError
from pmd_pipeline.faults import crash_point
from shards.layout import IMAGE_EXT, SIDECAR_SUFFIX, TOKENS_EXT, ShardPaths, atomic_write_json, temp_path_for
from shards.stats import parse_sidecar


def sidecar_path(paths: ShardPaths) -> Path:
    return paths.folder / f"{paths.name}{SIDECAR_SUFFIX}"


def read_sidecar(paths: ShardPaths) -> dict | None:
    """A shard's sidecar without its code counts (code_counts None), or None when it has none."""
    path = sidecar_path(paths)
    if not path.exists():
        return None
    try:
        return parse_sidecar(str(path), with_codes=False)
    except PmdError:
        return None  # a sidecar is written atomically, so this is damage from outside: redo the shard


def needs_tokens(paths: ShardPaths, identity: str, force: bool) -> bool:
    """False for a shard already tokenized with this codebook; refuses another codebook's shard unless `force`."""
    sidecar = read_sidecar(paths)
    if sidecar is None:
        return True
    if sidecar["codebook"] != identity and not force:
        raise PmdError(
            f"{paths.tar} was tokenized with codebook {sidecar['codebook']!r}, not {identity!r}; "
            "run `pmd tokenize OUT --force` (with --codebook/--precision as wanted) to redo every shard alike"
        )
    return force


def tokenize_shard(paths: ShardPaths, tokenizer: DvaeTokenizer, identity: str, batch_size: int, force=False) -> dict:
    """Add tokens to one finished shard and return its sidecar (a shard that needs nothing is returned as is)."""
    if not paths.is_done():
        raise PmdError(f"{paths.tar} is not a finished shard (no {paths.stats.name}); run `pmd build` first")
    if not needs_tokens(paths, identity, force):
        return {**read_sidecar(paths), "skipped": True}
    started = time.time()
    _remove_stale_temp_files(paths)
    samples = read_samples(paths.tar)
    failures = add_tokens(samples, tokenizer, batch_size)
    tar_bytes, tar_sha256 = rewrite_tar(paths.tar, samples, before_rename=lambda: crash_point("tokenize", paths.out))
    sidecar = _sidecar(identity, samples, failures, tar_bytes, tar_sha256, time.time() - started)
    sidecar.update(precision=tokenizer.precision, int8_agreement_vs_fp32=tokenizer.int8_agreement)
    crash_point("tokenize_sidecar", paths.out)
    atomic_write_json(sidecar_path(paths), sidecar)  # last: marks the shard tokenized
    return sidecar


def _remove_stale_temp_files(paths: ShardPaths) -> None:
    for tmp in paths.folder.glob(f".{paths.name}.tar.*.tmp"):
        tmp.unlink(missing_ok=True)


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


def add_tokens(samples: list[dict], tokenizer: DvaeTokenizer, batch_size: int) -> Counter:
    """Set KEY.dvae.npy on every image sample that tokenizes; the others lose any old tokens and count a reason."""
    failures: Counter = Counter()
    batch: list[tuple[dict, np.ndarray]] = []
    for sample in samples:
        sample.pop(TOKENS_EXT, None)  # tokens of another codebook never survive a redo
        if IMAGE_EXT not in sample:
            continue
        try:
            batch.append((sample, encoder_pixels(sample[IMAGE_EXT])))
        except BadImage as err:
            failures[err.reason] += 1
        if len(batch) == batch_size:
            _encode(batch, tokenizer, failures)
            batch = []
    if batch:
        _encode(batch, tokenizer, failures)
    return failures


def _encode(batch: list[tuple[dict, np.ndarray]], tokenizer: DvaeTokenizer, failures: Counter) -> None:
    tokens = tokenizer.tokens(np.stack([pixels for _, pixels in batch]))
    for (sample, _), grid in zip(batch, tokens, strict=True):
        problem = token_problem(grid)
        if problem:
            failures[problem] += 1
        else:
            sample[TOKENS_EXT] = npy_bytes(grid)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def rewrite_tar(path: Path, samples: list[dict], before_rename: Callable[[], None] = lambda: None) -> tuple[int, str]:
    """Write the samples to a temporary tar, fsync, rename over `path`; same fixed headers as shards/writer.py."""
    tmp = temp_path_for(path)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user="pmd", group="pmd", mode=0o444, mtime=0, encoder=False) as tar:
                for sample in samples:
                    tar.write(sample)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = tmp.stat().st_size
        before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def _sidecar(identity: str, samples: list[dict], failures: Counter, tar_bytes: int, sha: str, seconds: float) -> dict:
    grids = [np.load(io.BytesIO(s[TOKENS_EXT])) for s in samples if TOKENS_EXT in s]
    counts = np.bincount(np.concatenate([g.ravel() for g in grids]), minlength=VOCAB_SIZE) if grids else None
    return {
        "codebook": identity,
        "codebook_random": identity.startswith("random"),
        "samples_tokenized": len(grids),
        "samples_failed": sum(failures.values()),
        "failure_reasons": dict(failures),
        "code_counts": counts.tolist() if counts is not None else [0] * VOCAB_SIZE,
        "tar_sha256": sha,
        "tar_bytes": tar_bytes,
        "seconds": round(seconds, 3),
    }
