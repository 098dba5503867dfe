"""The filter contract: a filter scores a batch of captions, then decides which to keep."""

from __future__ import annotations

from typing import Protocol

import polars as pl


class CaptionFilter(Protocol):
    name: str  # registry key, also the score column suffix (score_<name>)
    reason: str  # the drop reason code recorded for a caption this filter rejects

    def score(self, captions: pl.Series) -> pl.Series:
        """One number per caption (Float64), recorded in the shard parquet."""

    def keep(self, scores: pl.Series) -> pl.Series:
        """One boolean per score: True keeps the caption."""
