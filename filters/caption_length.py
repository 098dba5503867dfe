"""Caption length, counted on whitespace: by default more than two words (YFCC's rule in PMD); with
`min_words = 1` it drops only empty captions (the global default chain, pmd_pipeline/config.py)."""

from __future__ import annotations

import polars as pl
from pydantic import validate_call

from pmd_pipeline.config import AtLeastZero


class CaptionLength:
    name = "caption_length"
    reason = "too_few_words"

    @validate_call  # the config's parameters are checked like every other config value
    def __init__(self, min_words: AtLeastZero = 3, max_words: AtLeastZero | None = None):
        self.min_words = min_words
        self.max_words = max_words

    def score(self, captions: pl.Series) -> pl.Series:
        return captions.fill_null("").str.count_matches(r"\S+").cast(pl.Float64)

    def keep(self, scores: pl.Series) -> pl.Series:
        keep = scores >= self.min_words
        return keep if self.max_words is None else keep & (scores <= self.max_words)
