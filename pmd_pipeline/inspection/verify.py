"""`pmd verify`: re-read every tar, check each sample and the counts and sha256 against the manifest.

Also rewrites, per source folder, webdataset's `sizes.json` ({tar name: samples}, as open_clip reads it) and
a wids shard index `shardindex.json` (the format `widsindex create` writes) from the samples it counted; the build
writes them, and the build-wide ones, with the manifest (pmd_pipeline.indexes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.markup import escape
from rich.table import Table

from pmd_pipeline.errors import PmdError
from pmd_pipeline.indexes import Tar, write_source_indexes
from pmd_pipeline.inspection import console_for
from shards.layout import (
    CLASS_EXT,
    CODEBOOK_SIZE,
    IMAGE_EXT,
    JSON_EXT,
    MANIFEST_FILE,
    SIDECAR_SUFFIX,
    SIZES_FILE,
    STATS_SUFFIX,
    TEXT_EXT,
    TOKENS_EXT,
    WIDS_INDEX,
    shard_tars,
)
from shards.schema import json_problems
from shards.stats import source_names

KNOWN_EXTS = {IMAGE_EXT, TEXT_EXT, JSON_EXT, TOKENS_EXT, CLASS_EXT}
IMAGE_ONLY_SOURCES = {"imagenet"}  # the shared contract: unimodal sources write their own shard sets
TEXT_ONLY_SOURCES = {"text_corpus"}
TOKEN_SHAPE = (14, 14)
MAX_LISTED = 30


@dataclass
class ShardCheck:
    tar: str  # relative to OUT
    samples: int = 0
    tokens: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def run_verify(out: Path, source: str | None = None) -> bool:
    """Verify, write the indexes, print a report; True when nothing is wrong."""
    checks = verify_build(out, source)
    for name, shard_checks in checks.items():
        found = [Tar(name, c.tar, c.samples, c.bytes) for c in shard_checks if (out / c.tar).exists()]
        write_source_indexes(out / name, found, within=out)
    _report(checks)
    return not any(c.problems for cs in checks.values() for c in cs)


def verify_build(out: Path, source: str | None = None) -> dict[str, list[ShardCheck]]:
    manifest = _manifest(out)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # hashing and decoding release the GIL
        return {name: verify_source(out, name, manifest, pool) for name in source_names(out, source)}


def _manifest(out: Path) -> dict:
    path = out / MANIFEST_FILE
    if not path.exists():
        raise PmdError(f"{out} has no {MANIFEST_FILE}: the build has not finished; re-run `pmd build`")
    return json.loads(path.read_text())


def verify_source(out: Path, name: str, manifest: dict, pool: ThreadPoolExecutor) -> list[ShardCheck]:
    listed = {s["tar"]: s for s in manifest["sources"].get(name, {}).get("shard_files", [])}
    on_disk = {f"{name}/{p.name}" for p in shard_tars(out / name)}
    checks = list(pool.map(lambda tar: verify_shard(out, name, tar, listed.get(tar)), sorted(listed.keys() | on_disk)))
    if name not in manifest["sources"]:
        checks.append(ShardCheck(f"{name}/", problems=["source is missing from manifest.json"]))
    return checks


def verify_shard(out: Path, source: str, tar: str, listed: dict | None) -> ShardCheck:
    check = ShardCheck(tar)
    path = out / tar
    if not path.exists():
        check.problems.append("listed in manifest.json but missing on disk")
        return check
    if listed is None:
        check.problems.append("tar on disk is not listed in manifest.json")
    data = path.read_bytes()
    check.bytes = len(data)
    digest = hashlib.sha256(data).hexdigest()
    if listed and listed["sha256"] != digest:
        check.problems.append(f"sha256 {digest[:12]}… differs from manifest.json's {listed['sha256'][:12]}…")
    samples = _read_samples(data, check)
    for key, members in samples.items():
        check.problems += [f"{key}: {p}" for p in check_sample(source, members)]
    check.samples = len(samples)
    check.tokens = sum(TOKENS_EXT in m for m in samples.values())
    _check_counts(path, listed, digest, check)
    return check


def _read_samples(data: bytes, check: ShardCheck) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not member.isfile() or ext not in KNOWN_EXTS:
                    check.problems.append(f"unexpected member {member.name!r}")
                    continue
                if ext in samples.setdefault(key, {}):
                    check.problems.append(f"{key}: duplicate member .{ext}")
                samples[key][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        check.problems.append(f"unreadable tar: {err}")
    return samples


def required_members(source: str) -> set[str]:
    if source in TEXT_ONLY_SOURCES:
        return {TEXT_EXT}
    if source in IMAGE_ONLY_SOURCES:
        return {IMAGE_EXT, JSON_EXT}
    return {IMAGE_EXT, TEXT_EXT, JSON_EXT}


def check_sample(source: str, members: dict[str, bytes]) -> list[str]:
    """Problems of one sample: missing members, an image that does not decode, bad JSON or tokens."""
    problems = [f"missing .{ext}" for ext in sorted(required_members(source) - members.keys())]
    checkers = {
        IMAGE_EXT: _check_jpg,
        JSON_EXT: _check_json,
        TEXT_EXT: _check_txt,
        TOKENS_EXT: _check_tokens,
        CLASS_EXT: _check_cls,
    }
    for ext, data in members.items():
        problem = checkers[ext](data)
        if problem:
            problems.append(f".{ext}: {problem}")
    if not problems and JSON_EXT in members:
        problems += _agrees_with_json(json.loads(members[JSON_EXT]), members)
    return problems


def _agrees_with_json(doc: dict, members: dict[str, bytes]) -> list[str]:
    """KEY.txt is the first caption, KEY.cls the class index, as KEY.json says."""
    problems = []
    captions = doc["captions"]
    if TEXT_EXT in members and captions and members[TEXT_EXT].decode("utf-8") != captions[0]:
        problems.append(".txt is not the first caption of .json")
    cls = int(members[CLASS_EXT]) if CLASS_EXT in members else -1
    if cls != doc["cls"]:
        problems.append(f".cls is {cls if CLASS_EXT in members else 'missing'}, .json says cls {doc['cls']}")
    return problems


def _check_jpg(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return None if image.format == "JPEG" else f"stored as {image.format}, not JPEG"
    except Exception as err:  # PIL raises many kinds for broken images
        return f"does not decode ({type(err).__name__})"


def _check_json(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"does not parse ({err})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    problems = json_problems(doc)
    return f"breaks the sample schema: {'; '.join(problems[:3])}" if problems else None


def _check_cls(data: bytes) -> str | None:
    return None if data.isdigit() else f"{data[:20]!r} is not a class index in ASCII digits"


def _check_txt(data: bytes) -> str | None:
    try:
        return None if data.decode("utf-8").strip() else "empty caption"
    except UnicodeDecodeError:
        return "not UTF-8"


def _check_tokens(data: bytes) -> str | None:
    try:
        tokens = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # np.load raises ValueError, OSError, EOFError... on a damaged file
        return f"does not load ({type(err).__name__})"
    if tokens.shape != TOKEN_SHAPE or tokens.dtype != np.uint16:
        return f"shape {tokens.shape} dtype {tokens.dtype}, expected {TOKEN_SHAPE} uint16"
    if int(tokens.max()) >= CODEBOOK_SIZE:
        return f"code {int(tokens.max())} outside the codebook of {CODEBOOK_SIZE}"
    return None


def _check_counts(path: Path, listed: dict | None, digest: str, check: ShardCheck) -> None:
    """Sample counts vs the manifest and the shard's stats; a tokens sidecar must describe this very tar."""
    if listed and listed["samples"] != check.samples:
        check.problems.append(f"{check.samples} samples, manifest.json says {listed['samples']}")
    stats_path = path.with_name(path.stem + STATS_SUFFIX)
    if not stats_path.exists():
        check.problems.append("no _stats.json: the shard never finished")
    elif (written := json.loads(stats_path.read_text())["samples_written"]) != check.samples:
        check.problems.append(f"{check.samples} samples, its _stats.json says {written}")
    sidecar_path = path.with_name(path.stem + SIDECAR_SUFFIX)
    if not sidecar_path.exists():
        if check.tokens:
            check.problems.append(f"{check.tokens} samples carry tokens but there is no _dvae.json sidecar")
        return
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar["tar_sha256"] != digest:
        check.problems.append("_dvae.json describes another tar (tar_sha256 differs)")
    if sidecar["samples_tokenized"] != check.tokens:
        check.problems.append(f"{check.tokens} samples carry tokens, _dvae.json says {sidecar['samples_tokenized']}")


def _report(checks: dict[str, list[ShardCheck]]) -> None:
    table = Table("source", "shards", "samples", "with tokens", "problems", title="pmd verify", title_justify="left")
    for name, cs in checks.items():
        problems = sum(len(c.problems) for c in cs)
        style = "red" if problems else "green"
        table.add_row(
            name,
            str(len(cs)),
            f"{sum(c.samples for c in cs):,}",
            f"{sum(c.tokens for c in cs):,}",
            f"[{style}]{problems}[/]",
        )
    console = console_for(table)
    console.print(table)
    listed = [f"{c.tar}: {p}" for cs in checks.values() for c in cs for p in c.problems]
    for line in listed[:MAX_LISTED]:
        console.print(f"[red]✗[/] {escape(line)}", highlight=False)
    if len(listed) > MAX_LISTED:
        console.print(f"... and {len(listed) - MAX_LISTED} more problems", highlight=False)
    if not listed:
        console.print(
            f"[green]✓[/] every sample complete; counts and sha256 match the manifest; {SIZES_FILE} and "
            f"{WIDS_INDEX} rewritten in each source folder",
            highlight=False,
        )
