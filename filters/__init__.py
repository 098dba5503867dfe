"""Filter registry and the shared loop that applies filters to candidate rows, recording why each caption goes."""

from __future__ import annotations

import inspect

import polars as pl
from pydantic import ValidationError

from filters.base import CaptionFilter
from filters.caption_length import CaptionLength
from filters.english import English
from filters.no_datetime_only import NoDateTimeOnly
from filters.odd_characters import OddCharacters
from pmd_pipeline.config import FilterConfig, refusal
from pmd_pipeline.errors import PmdError

REGISTRY: dict[str, type] = {
    "caption_length": CaptionLength,
    "english": English,
    "no_datetime_only": NoDateTimeOnly,
    "odd_characters": OddCharacters,
}

UNUSED_ALTERNATIVE = "unused_alternative"  # a first_passing row's later fallbacks once one caption passed
IMAGE_ONLY = "image_only"  # caption_mode of unimodal image rows: no caption to filter, the row is kept


def build_filters(configs: list[FilterConfig]) -> list[CaptionFilter]:
    return [_build_filter(cfg) for cfg in configs]


def _build_filter(cfg: FilterConfig) -> CaptionFilter:
    """The filter, or one line naming the unknown name, an unknown parameter or a value out of range."""
    if cfg.name not in REGISTRY:
        raise PmdError(f"unknown filter {cfg.name!r}; valid filters: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[cfg.name]
    valid = sorted(inspect.signature(cls).parameters)
    unknown = sorted(set(cfg.params) - set(valid))
    if unknown:
        valid_text = ", ".join(valid) or "none"
        raise PmdError(f"filter {cfg.name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid_text}")
    try:
        return cls(**cfg.params)
    except ValidationError as err:
        raise PmdError(f"filter {cfg.name}: {refusal(err, '')}") from None


def apply_filters(rows: pl.DataFrame, filters: list[CaptionFilter]) -> pl.DataFrame:
    """Add caption_reasons, score_<filter>, kept_captions, kept_fields and the row's drop `reason` (null = keep).

    A row survives when at least one caption survives. A dropped row's reason is the source's own
    drop_reason, else the reason of its last rejected caption (for YFCC: why the title fallback failed).
    """
    rows = rows.with_row_index("_row")
    has_captions = pl.col("drop_reason").is_null() & (pl.col("caption_mode") != IMAGE_ONLY)
    captions = _explode_captions(rows.filter(has_captions))
    for f in filters:
        captions = _run_filter(captions, f)
    captions = _pick_first_passing(captions)
    per_row = _regroup(captions, [f.name for f in filters])
    out = rows.join(per_row, on="_row", how="left")
    reason = (
        pl.when(pl.col("drop_reason").is_not_null())
        .then(pl.col("drop_reason"))
        .when(pl.col("caption_mode") == IMAGE_ONLY)
        .then(None)
        .when(pl.col("kept_captions").list.len().fill_null(0) == 0)
        .then(pl.col("_last_reason").fill_null("no_caption"))
    )
    return out.with_columns(reason=reason).drop("_row", "_last_reason")


def _explode_captions(rows: pl.DataFrame) -> pl.DataFrame:
    return (
        rows.select(
            "_row",
            "caption_mode",
            caption=pl.col("captions"),
            field=pl.col("caption_fields"),
            position=pl.int_ranges(pl.col("captions").list.len()),
        )
        .explode("caption", "field", "position")
        .filter(pl.col("position").is_not_null())
        .with_row_index("_cap")
        .with_columns(reason=pl.lit(None, dtype=pl.Utf8))
    )


def _run_filter(captions: pl.DataFrame, f: CaptionFilter) -> pl.DataFrame:
    """Score only captions still alive (filters can be expensive), then mark the rejected ones."""
    alive = captions.filter(pl.col("reason").is_null())
    scores = f.score(alive["caption"])
    verdict = pl.DataFrame({"_cap": alive["_cap"], f"score_{f.name}": scores, "_keep": f.keep(scores)})
    captions = captions.join(verdict, on="_cap", how="left")
    failed = pl.col("reason").is_null() & ~pl.col("_keep").fill_null(True)
    return captions.with_columns(reason=pl.when(failed).then(pl.lit(f.reason)).otherwise("reason")).drop("_keep")


def _pick_first_passing(captions: pl.DataFrame) -> pl.DataFrame:
    passing_rank = pl.col("reason").is_null().cast(pl.Int32).cum_sum().over("_row")
    unused = (pl.col("caption_mode") == "first_passing") & pl.col("reason").is_null() & (passing_rank > 1)
    return captions.with_columns(reason=pl.when(unused).then(pl.lit(UNUSED_ALTERNATIVE)).otherwise("reason"))


def _regroup(captions: pl.DataFrame, filter_names: list[str]) -> pl.DataFrame:
    kept = pl.col("reason").is_null()
    rejected = pl.col("reason").is_not_null() & (pl.col("reason") != UNUSED_ALTERNATIVE)
    return captions.group_by("_row", maintain_order=True).agg(
        caption_reasons=pl.col("reason"),
        kept_captions=pl.col("caption").filter(kept),
        kept_fields=pl.col("field").filter(kept),
        _last_reason=pl.col("reason").filter(rejected).last(),
        **{f"score_{name}": pl.col(f"score_{name}") for name in filter_names},
    )
