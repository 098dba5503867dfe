"""English, by langdetect: deterministic (seeded) and computed once per distinct text.

langdetect is the slow part of the YFCC stage (milliseconds per text). Captions repeat a lot at
PMD scale (camera defaults, re-uploads, boilerplate), so each distinct text is detected once per
process; the cache is bounded so a 30M-row source cannot grow it without limit.
"""

from __future__ import annotations

from functools import lru_cache

import polars as pl
from langdetect import DetectorFactory, detect_langs
from langdetect.lang_detect_exception import LangDetectException
from pydantic import validate_call

from pmd_pipeline.config import Share

DetectorFactory.seed = 0  # langdetect is randomised; a fixed seed makes its decisions reproducible


@lru_cache(maxsize=1_000_000)
def english_probability(text: str) -> float:
    """langdetect's probability that `text` is English (0.0 when it finds no language at all)."""
    try:
        return next((lang.prob for lang in detect_langs(text) if lang.lang == "en"), 0.0)
    except LangDetectException:
        return 0.0


class English:
    name = "english"
    reason = "not_english"

    @validate_call  # the config's parameters are checked like every other config value
    def __init__(self, min_probability: Share = 0.5):
        self.min_probability = min_probability

    def score(self, captions: pl.Series) -> pl.Series:
        distinct = captions.fill_null("").unique()
        probabilities = pl.DataFrame(
            {"caption": distinct, "p": [english_probability(t) for t in distinct]},
            schema={"caption": pl.Utf8, "p": pl.Float64},
        )
        return pl.DataFrame({"caption": captions.fill_null("")}).join(probabilities, on="caption", how="left")["p"]

    def keep(self, scores: pl.Series) -> pl.Series:
        return scores >= self.min_probability
