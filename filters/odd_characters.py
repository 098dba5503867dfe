"""Reject texts with odd characters: control characters, the Unicode replacement character, or too
small a share of ordinary characters (letters, digits, whitespace, common punctuation).

Captions made of markup debris, file names and symbol runs (`___`, `{{...}}`, `|||`) teach nothing.
"""

from __future__ import annotations

import polars as pl
from pydantic import validate_call

from pmd_pipeline.config import Share

ORDINARY = r"[\p{L}\p{N}\s.,;:!?'\"()&%$€£/+\-]"
BROKEN = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x{FFFD}]"


class OddCharacters:
    name = "odd_characters"
    reason = "odd_characters"

    @validate_call  # the config's parameters are checked like every other config value
    def __init__(self, min_ordinary_share: Share = 0.9):
        self.min_ordinary_share = min_ordinary_share

    def score(self, captions: pl.Series) -> pl.Series:
        """The share of ordinary characters; 0.0 when a control or replacement character is present."""
        text = captions.fill_null("")
        share = text.str.count_matches(ORDINARY) / text.str.len_chars().clip(lower_bound=1)
        return pl.select(pl.when(text.str.contains(BROKEN)).then(0.0).otherwise(share)).to_series().cast(pl.Float64)

    def keep(self, scores: pl.Series) -> pl.Series:
        return scores >= self.min_ordinary_share
