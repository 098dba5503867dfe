"""Check the shards before training: tokens present, one codebook, no empty task; say what to do if not."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from pmd_pipeline.errors import PmdError
from pmd_pipeline.storage import as_path
from pmd_pipeline.train.config import DataConfig
from shards.layout import SIDECAR_SUFFIX, STATS_SUFFIX, TAR_SUFFIX, shard_tars


@dataclass
class Preflight:
    tars: dict[str, list[str]]  # task -> tar paths
    samples: dict[str, int]  # task -> samples in those tars
    mix: dict[str, float]  # the configured mix, tasks without data set to 0
    codebook: str
    counts: dict[str, list[int]] = field(default_factory=dict)  # task -> samples per tar (absent: a URL list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> shards left out
    notes: list[str] = field(default_factory=list)


def preflight(data: DataConfig) -> Preflight:
    if is_shard_list(data.shards):
        return _listed_shards(data)
    root = as_path(data.shards)  # a local folder or a bucket's (s3://bucket/pmd): read in place, never copied
    if not root.is_dir() or not any(root.glob(f"*/*{TAR_SUFFIX}")):
        raise PmdError(f"no shards in {root}: run `just build-pmd` first (or set data.shards in the config)")
    report = Preflight(tars={}, samples={}, mix=dict(data.mix), codebook="")
    codebooks: dict[str, str] = {}
    for task, folders in _task_folders(root, data).items():
        tars, counts = [], []
        for folder in folders:
            for tar, count in _finished_shards(folder, task, data, report, codebooks):
                tars.append(str(tar))
                counts.append(count)
        samples = sum(counts)
        report.tars[task], report.samples[task], report.counts[task] = tars, samples, counts
        if samples == 0 and report.mix.get(task, 0) > 0:
            report.notes.append(f"task '{task}' has no samples in {root}: its weight {report.mix[task]} is set to 0")
            report.mix[task] = 0.0
    if sum(report.mix.values()) <= 0:
        raise PmdError(f"no usable samples in {root} for any task: " + "; ".join(report.notes))
    report.codebook = _one_codebook(codebooks, data.codebook)
    return report


def is_shard_list(shards: str) -> bool:
    """open_clip's conventions: a brace list (`.../{00000..00099}.tar`), `pipe:COMMAND`, or lists joined by `::`."""
    return shards.startswith("pipe:") or "{" in shards or "::" in shards or shards.endswith(TAR_SUFFIX)


def _listed_shards(data: DataConfig) -> Preflight:
    """Tars named by URL are paired data; nothing beside them is read, so tokens and codebook are not checked here
    (a sample without tokens is counted and skipped by the loader)."""
    tars = [url for part in data.shards.split("::") for url in braceexpand(part)]
    report = Preflight(tars={"pairs": tars, "image": [], "text": []}, samples={}, mix=dict(data.mix), codebook="")
    report.codebook = data.codebook
    for task in ("image", "text"):
        if report.mix.get(task, 0) > 0:
            report.notes.append(f"task '{task}' has no shards in a URL list: its weight {report.mix[task]} is set to 0")
            report.mix[task] = 0.0
    report.notes.append(f"{len(tars)} shards from a URL list: their stats and tokens are not checked before training")
    return report


def _task_folders(root: Path, data: DataConfig) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    unimodal = set(data.image_only) | set(data.text_only)
    pairs = [p for p in folders if (p.name in data.pairs if data.pairs else p.name not in unimodal)]
    return {
        "pairs": pairs,
        "image": [p for p in folders if p.name in data.image_only],
        "text": [p for p in folders if p.name in data.text_only],
    }


def _finished_shards(folder: Path, task: str, data: DataConfig, report: Preflight, codebooks: dict):
    for tar in shard_tars(folder):
        stats_path = tar.with_name(f"{tar.stem}{STATS_SUFFIX}")
        if not stats_path.exists():  # still being written (or crashed): the build's resume will finish it
            report.skipped["unfinished"] = report.skipped.get("unfinished", 0) + 1
            continue
        count = json.loads(stats_path.read_text()).get("samples_written", 0)
        if task != "text":
            sidecar = tar.with_name(f"{tar.stem}{SIDECAR_SUFFIX}")
            if not sidecar.exists():
                if not data.skip_untokenized:
                    raise PmdError(
                        f"{tar} has no dVAE tokens ({sidecar.name} missing): run the tokenize stage of "
                        "`just build-pmd` first, or set data.skip_untokenized = true to leave such shards out"
                    )
                report.skipped["no_tokens"] = report.skipped.get("no_tokens", 0) + 1
                continue
            meta = json.loads(sidecar.read_text())
            codebooks[str(tar)] = meta["codebook"]
            count = meta.get("samples_tokenized", count)
        if count:
            yield tar, count


def _one_codebook(codebooks: dict[str, str], wanted: str) -> str:
    found = sorted(set(codebooks.values()))
    if len(found) > 1:
        example = {cb: next(t for t, c in codebooks.items() if c == cb) for cb in found}
        raise PmdError(f"shards carry tokens from {len(found)} different codebooks, e.g. {example}: retokenize them")
    if found and wanted != "auto" and found[0] != wanted:
        raise PmdError(f"shards' tokens are from codebook {found[0]!r} but the run expects {wanted!r}")
    return found[0] if found else wanted
