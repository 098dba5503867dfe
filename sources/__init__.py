"""Source registry: one module per PMD source, keyed by the `source` name used in shards and configs."""

from __future__ import annotations

from collections.abc import Iterable

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


def paper_total(names: Iterable[str]) -> dict | None:
    """FLAVA Table 2's pairs (millions) and pairs-weighted mean words over these sources, each figure counted
    once: Localized Narratives' subsets share one figure (`paper_group`), so its 1.9M counts once however
    many subsets are named. None when no named source is in the table (unimodal or unknown ones only)."""
    figures = {}
    for name in names:
        source = REGISTRY.get(name)
        if source is not None and source.info.paper_pairs:
            figures[source.info.paper_group or name] = (source.info.paper_pairs, source.info.paper_avg_words)
    if not figures:
        return None
    pairs = sum(p for p, _ in figures.values())
    words = sum(p * w for p, w in figures.values()) / pairs
    return {"pairs_millions": round(pairs, 2), "mean_words": round(words, 2)}


def paper_group_members(group: str) -> list[str]:
    """The registered sources that share one figure of the paper's table (e.g. the four LN subsets)."""
    return [name for name, source in REGISTRY.items() if source.info.paper_group == group]
