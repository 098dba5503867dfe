"""Source registry: one module per PMD source, keyed by the `source` name used in shards and configs."""

from __future__ import annotations

from pmd_pipeline.errors import PmdError
from sources import coco, conceptual_captions
from sources.base import Source

REGISTRY: dict[str, Source] = {
    "coco": coco.SOURCE,
    "conceptual_captions": conceptual_captions.SOURCE,
}


def get_source(name: str) -> Source:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PmdError(f"unknown source {name!r}; valid sources: {', '.join(sorted(REGISTRY))}") from None
