"""Source registry: one module per PMD source, keyed by the `source` name used in shards and configs."""

from __future__ import annotations

from pmd_pipeline.errors import PmdError
from sources import (
    coco,
    conceptual_12m,
    conceptual_captions,
    imagenet,
    localized_narratives,
    red_caps,
    sbu_captions,
    text_corpus,
    visual_genome,
    wit,
    yfcc100m,
)
from sources.base import Source

REGISTRY: dict[str, Source] = {
    "coco": coco.SOURCE,
    "sbu_captions": sbu_captions.SOURCE,
    **localized_narratives.SOURCES,
    "conceptual_captions": conceptual_captions.SOURCE,
    "visual_genome": visual_genome.SOURCE,
    "wit": wit.SOURCE,
    "conceptual_12m": conceptual_12m.SOURCE,
    "red_caps": red_caps.SOURCE,
    "yfcc100m": yfcc100m.SOURCE,
    # unimodal, for joint pretraining
    "imagenet": imagenet.SOURCE,
    "text_corpus": text_corpus.SOURCE,
}

UNIMODAL = {"imagenet": "image", "text_corpus": "text"}


def get_source(name: str) -> Source:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PmdError(f"unknown source {name!r}; valid sources: {', '.join(sorted(REGISTRY))}") from None
