"""Helpers for the stats/show/verify/interop tests: copy a build, add dVAE tokens the way the sidecar contract says."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from shards import tar as shard_tar
from shards.files import atomic_write_json

CODES_USED = 300  # the fake tokens draw from the first 300 codes, so "codes used" is checkable
CODEBOOK_ID = "random, seed 0"


def copy_build(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("_embedded", "_work"))
    return to


def read_members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive]


def write_tar(tar: Path, members: list[tuple[str, bytes]]) -> None:
    """Samples in member order, grouped by key like the shard writer does."""
    samples: dict[str, dict] = {}
    for name, data in members:
        key, _, ext = name.partition(".")
        samples.setdefault(key, {"__key__": key})[ext] = data
    shard_tar.write_tar(tar, samples.values())


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tokenize_shard(tar: Path, rng: np.random.Generator) -> dict:
    """Rewrite the tar with KEY.dvae.npy beside every KEY.jpg, then write the sidecar last."""
    members, counts = [], np.zeros(8192, dtype=np.int64)
    for name, data in read_members(tar):
        members.append((name, data))
        if name.endswith(".jpg"):
            tokens = rng.integers(0, CODES_USED, size=(14, 14), dtype=np.uint16)
            counts += np.bincount(tokens.ravel(), minlength=8192)
            members.append((name.removesuffix(".jpg") + ".dvae.npy", npy_bytes(tokens)))
    write_tar(tar, members)
    sidecar = {
        "codebook": CODEBOOK_ID,
        "codebook_random": True,
        "samples_tokenized": sum(n.endswith(".dvae.npy") for n, _ in members),
        "samples_failed": 0,
        "failure_reasons": {},
        "code_counts": counts.tolist(),
        "tar_sha256": hashlib.sha256(tar.read_bytes()).hexdigest(),
        "tar_bytes": tar.stat().st_size,
        "seconds": 0.01,
    }
    atomic_write_json(tar.with_name(tar.stem + "_dvae.json"), sidecar)
    return sidecar


def tokenize_build(out: Path, only: int | None = None) -> Path:
    """Tokenize every shard (or the first `only`), refreshing the manifest's sha256 and its `tokens` entry."""
    rng = np.random.default_rng(0)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [s for entry in manifest["sources"].values() for s in entry["shard_files"]]
    for shard in shards[:only]:
        shard["sha256"] = tokenize_shard(out / shard["tar"], rng)["tar_sha256"]
    manifest["tokens"] = {"codebook": CODEBOOK_ID, "random": True, "note": "test tokens from a random generator"}
    atomic_write_json(out / "manifest.json", manifest)
    return out


def tar_samples(out: Path, source: str | None = None) -> dict[str, dict[str, bytes]]:
    """Every sample of a build read straight from the tars: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob(f"{source or '*'}/[0-9]*.tar")):
        for name, data in read_members(tar):
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})[ext] = data
    return samples
