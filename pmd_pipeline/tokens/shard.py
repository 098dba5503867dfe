"""Tokenize one finished shard: add KEY.dvae.npy to every image sample, atomically, then write NNNNN_dvae.json last.

The tar is rewritten under a temporary name and renamed over the old one; the `_dvae.json` sidecar,
written after the rename, marks the shard tokenized. A shard killed half-way has no sidecar (and at most
a stray temporary file, removed on the next attempt), so it is simply redone. A sidecar from another
codebook is never overwritten without `force`.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np

from pmd_pipeline.errors import PmdError
from pmd_pipeline.faults import crash_point
from pmd_pipeline.tokens.encoder import BadImage, DvaeTokenizer, encoder_pixels, token_problem
from shards.files import remove_temp_files
from shards.layout import IMAGE_EXT, TOKENS_EXT, ShardPaths
from shards.sidecar import make_sidecar, read_sidecar, write_sidecar
from shards.tar import read_samples, write_tar


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
    # of a killed rewrite; the old tar is intact
    remove_temp_files(paths.folder, f"{paths.tar.name}.", within=paths.out)
    samples = read_samples(paths.tar)
    failures = add_tokens(samples, tokenizer, batch_size)
    tar_bytes, tar_sha256 = write_tar(
        paths.tar, samples, before_rename=lambda: crash_point("tokenize", paths.out), within=paths.out
    )
    sidecar = make_sidecar(
        identity,
        samples,
        failures,
        tar_bytes,
        tar_sha256,
        seconds=round(time.time() - started, 3),
        precision=tokenizer.precision,
        int8_agreement_vs_fp32=tokenizer.int8_agreement,
    )
    crash_point("tokenize_sidecar", paths.out)
    write_sidecar(paths, sidecar)  # last: marks the shard tokenized
    return sidecar


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
