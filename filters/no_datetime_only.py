"""Reject texts that are only a date or a time (camera defaults such as `2013 10 09` or `12:30:01`)."""

from __future__ import annotations

import polars as pl

# Digits and the separators dates and times are written with, and nothing else.
DATE_TIME_ONLY = r"^[\d\s:./\-_,]*\d[\d\s:./\-_,]*$"


class NoDateTimeOnly:
    name = "no_datetime_only"
    reason = "datetime_only"

    def score(self, captions: pl.Series) -> pl.Series:
        """1.0 for a date/time-only text."""
        return captions.fill_null("").str.strip_chars().str.contains(DATE_TIME_ONLY).cast(pl.Float64)

    def keep(self, scores: pl.Series) -> pl.Series:
        return scores < 0.5
