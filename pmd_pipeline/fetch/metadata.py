"""Metadata given as http(s) URLs is downloaded once into OUT/_metadata/<source>/ and read from there."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.errors import PmdError, is_disk_full
from pmd_pipeline.fetch.mirror import rewrite_url
from pmd_pipeline.fetch.web import WebPolicy, stream_url
from pmd_pipeline.storage import as_path, url_of
from shards.files import atomic_path, owned_path
from shards.layout import METADATA_FOLDER


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def localize_metadata(cfg: BuildConfig, source_cfg: SourceConfig) -> SourceConfig:
    """The same source config with every metadata URL replaced by its downloaded copy."""
    folder = as_path(cfg.out) / METADATA_FOLDER / source_cfg.name
    local = [url_of(_download(url, folder, cfg)) if is_url(url) else url for url in source_cfg.metadata]
    return replace(source_cfg, metadata=local)


def _download(url: str, folder: Path, cfg: BuildConfig) -> Path:
    fetch, out = cfg.fetch, as_path(cfg.out)
    target = folder / (Path(url.split("?")[0]).name or "metadata")
    if owned_path(out, target).exists():
        return target  # downloaded by an earlier run: metadata of a build never changes under it
    try:
        with (
            atomic_path(target, within=out) as tmp,
            stream_url(rewrite_url(url, fetch.mirror), WebPolicy.from_config(fetch)) as r,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(r, f)
    except OSError as err:
        if is_disk_full(err):
            raise  # the build stops once for a full device, not as one source's failure
        raise PmdError(f"could not download metadata {url}: {err}") from None
    return target
