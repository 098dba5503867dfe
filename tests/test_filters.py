"""The shared filter loop: caption-level decisions, first-passing fallbacks, and a reason for every drop."""

from __future__ import annotations

from filters import apply_filters, build_filters
from pmd_pipeline.config import FilterConfig
from sources.base import candidates_frame


def run_filters(rows, **params):
    return {
        r["key"]: r
        for r in apply_filters(
            candidates_frame(rows), build_filters([FilterConfig("caption_length", params)])
        ).iter_rows(named=True)
    }


def test_more_than_two_words_is_the_default():
    out = run_filters(
        [
            {
                "key": "a",
                "captions": ["a red car", "red car", "  red   car  "],
                "caption_fields": ["c"] * 3,
                "caption_mode": "all",
            }
        ]
    )
    assert out["a"]["kept_captions"] == ["a red car"]
    assert out["a"]["caption_reasons"] == [None, "too_few_words", "too_few_words"]
    assert out["a"]["score_caption_length"] == [3.0, 2.0, 2.0]
    assert out["a"]["reason"] is None


def test_first_passing_keeps_only_the_first_caption_that_passes():
    out = run_filters(
        [
            {
                "key": "desc",
                "captions": ["a long description here", "a title too"],
                "caption_fields": ["description", "title"],
                "caption_mode": "first_passing",
            },
            {
                "key": "title",
                "captions": ["", "a usable title"],
                "caption_fields": ["description", "title"],
                "caption_mode": "first_passing",
            },
            {
                "key": "none",
                "captions": ["hi", "there"],
                "caption_fields": ["description", "title"],
                "caption_mode": "first_passing",
            },
        ]
    )
    assert out["desc"]["kept_captions"] == ["a long description here"]
    assert out["desc"]["caption_reasons"] == [None, "unused_alternative"]
    assert out["title"]["kept_fields"] == ["title"]
    assert out["none"]["reason"] == "too_few_words"


def test_rows_without_captions_and_source_drops_keep_their_reason():
    out = run_filters(
        [
            {"key": "empty", "captions": [], "caption_fields": [], "caption_mode": "all"},
            {
                "key": "split",
                "captions": ["a fine long caption"],
                "caption_fields": ["raw"],
                "caption_mode": "all",
                "drop_reason": "karpathy_split_excluded",
            },
            {"key": "image", "captions": [], "caption_fields": [], "caption_mode": "image_only"},
        ]
    )
    assert out["empty"]["reason"] == "no_caption"
    assert out["split"]["reason"] == "karpathy_split_excluded"
    assert out["image"]["reason"] is None


def test_min_words_is_configurable():
    out = run_filters(
        [{"key": "a", "captions": ["one two three four"], "caption_fields": ["c"], "caption_mode": "all"}], min_words=5
    )
    assert out["a"]["reason"] == "too_few_words"
