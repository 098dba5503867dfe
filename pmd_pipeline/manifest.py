"""OUT/manifest.json: the resolved config, its hash, package versions, per-shard counts and sha256, and the size,
sha256 and md5 of every file the build downloaded."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from pmd_pipeline.card import write_card
from pmd_pipeline.config import BuildConfig
from pmd_pipeline.fetch.downloads import records
from pmd_pipeline.indexes import write_build_indexes
from pmd_pipeline.output import content_hash
from pmd_pipeline.storage import as_path
from shards.files import atomic_write_json
from shards.layout import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    PLAN_MARKER,
    SIDECAR_SUFFIX,
    STATS_SUFFIX,
    ShardPaths,
    plan_folder,
)
from shards.sidecar import INT8_SUFFIX, parse_sidecar

PACKAGES = ("pmd-pipeline", "img2dataset", "webdataset", "ray", "polars", "pyarrow", "torch", "transformers")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(cfg: BuildConfig) -> dict:
    out = as_path(cfg.out)
    sources = {s.name: _source_entry(out, s.name) for s in cfg.enabled_sources()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_hash": content_hash(cfg),
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "sources": sources,
        "tokens": tokens_entry(out, sources),
        "downloads": records(cfg),  # {URL: file under OUT, size, sha256, md5, the checksum it was checked against}
        "totals": {
            key: sum(s[key] for s in sources.values())
            for key in ("shards", "rows_in", "samples_written", "pairs_written", "rejected_raw_records")
        },
    }
    atomic_write_json(out / MANIFEST_FILE, manifest, within=out)
    write_build_indexes(out, manifest)
    write_card(out, manifest)
    return manifest


def _source_entry(out: Path, source: str) -> dict:
    plan = json.loads((plan_folder(out, source) / PLAN_MARKER).read_text())
    shards = [json.loads(p.read_text()) for p in sorted((out / source).glob(f"*{STATS_SUFFIX}"))]
    return {
        "shards": len(shards),
        "rows_in": sum(s["rows_in"] for s in shards),
        "samples_written": sum(s["samples_written"] for s in shards),
        "pairs_written": sum(s["pairs_written"] for s in shards),
        "rejected_raw_records": plan["rejected_raw_records"],
        "shard_files": [
            {"tar": f"{source}/{s['shard']}.tar", "samples": s["samples_written"], **_tar_state(out, source, s)}
            for s in shards
        ],
    }


def _tar_state(out: Path, source: str, stats: dict) -> dict:
    """The tar's current sha256 and size: the tokenize sidecar's once tokens were added (the tar was rewritten)."""
    sidecar = ShardPaths(out, source, int(stats["shard"])).sidecar
    if not sidecar.exists():
        return {"sha256": stats["tar_sha256"], "bytes": stats["tar_bytes"], "tokens": None}
    tokens = parse_sidecar(str(sidecar), with_codes=False)
    return {"sha256": tokens["tar_sha256"], "bytes": tokens["tar_bytes"], "tokens": tokens["codebook"]}


def tokens_entry(out: Path, sources: dict) -> dict:
    """Which codebook made the shards' KEY.dvae.npy, in plain words (a random one makes meaningless tokens)."""
    identities = {f["tokens"] for s in sources.values() for f in s["shard_files"]}
    if identities == {None} or not identities:
        return {"codebook": None, "random": False, "note": "no image tokens: the tokenize stage did not run"}
    if len(identities) > 1:
        return {"codebook": sorted(map(str, identities)), "random": False, "note": "MIXED codebooks: re-tokenize"}
    (identity,) = identities
    int8 = ""
    if identity.endswith(INT8_SUFFIX):
        agreement = _int8_agreement(out)
        int8 = f"; int8 approximation of the encoder: {agreement:.1%} of grid cells equal fp32's on held-out images"
    if identity.startswith("random"):
        note = (
            f"tokens from a randomly initialised dVAE encoder ({identity}): valid in shape and range, "
            "meaningless in content; give [tokenize] codebook a real checkpoint for training" + int8
        )
        return {"codebook": identity, "random": True, "note": note}
    note = "tokens from the dVAE encoder weights with this sha256 (FlavaImageCodebook / DALL-E encoder.pkl)" + int8
    return {"codebook": identity, "random": False, "note": note}


def _int8_agreement(out: Path) -> float:
    """The lowest agreement any shard's int8 tokenizer measured (one calibration per run, so usually one value)."""
    sidecars = [parse_sidecar(str(p), with_codes=False) for p in out.glob(f"*/*{SIDECAR_SUFFIX}")]
    return min(s.get("int8_agreement_vs_fp32") or 0.0 for s in sidecars)
