"""A source config whose URLs name downloaded copies (pmd_pipeline.fetch.downloads), for code outside a build.

`pmd build` downloads every file beforehand, as Ray tasks, and hands the plan stage configs that name only
local (or bucket) paths; `localize_metadata` is for a source planned on its own: it downloads what is missing
here, one file after the other, the same way (resumed, verified, recorded), then rewrites the URLs.
"""

from __future__ import annotations

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.fetch.downloads import download_file, downloads_of, is_url, localized

__all__ = ["is_url", "localize_metadata"]


def localize_metadata(cfg: BuildConfig, source_cfg: SourceConfig) -> SourceConfig:
    """The same source config with every URL (metadata, image archives, `*_file` options) replaced by its
    downloaded copy under OUT/_downloads; a config already localized is returned as it is."""
    for job in downloads_of(cfg, [source_cfg]):
        download_file(job, cfg.fetch, cfg.out)
    return localized(cfg, source_cfg)
