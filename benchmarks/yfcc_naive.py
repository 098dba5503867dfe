"""The YFCC rule written the straightforward way, one row at a time: the baseline the pipeline is
measured against, and an independent statement of the rule the tests check the pipeline's decisions with."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from langdetect import DetectorFactory, detect_langs
from langdetect.lang_detect_exception import LangDetectException

DetectorFactory.seed = 0

TAG = re.compile(r"</?[A-Za-z][^>]*>")  # an HTML tag starts with its name; "<->" and "<3" are text
SPACE = re.compile(r"\s+")
DATE_TIME_ONLY = re.compile(r"^[\d\s:./\-_,]*\d[\d\s:./\-_,]*$")
ORDINARY = re.compile(r"[\w\s.,;:!?'\"()&%$€£/+\-]")
BROKEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def clean(field: str) -> str:
    return SPACE.sub(" ", TAG.sub("", unquote_plus(field))).strip()  # a tag leaves nothing in its place


def english(text: str) -> bool:
    try:
        return next((lang.prob for lang in detect_langs(text) if lang.lang == "en"), 0.0) >= 0.5
    except LangDetectException:
        return False


def caption_reason(text: str) -> str | None:
    """Why a cleaned text fails, in the pipeline's filter order, or None when it passes."""
    if len(text.split()) < 3:
        return "too_few_words"
    if DATE_TIME_ONLY.match(text):
        return "datetime_only"
    ordinary = sum(1 for ch in text if ORDINARY.match(ch) and ch != "_") / max(len(text), 1)
    if BROKEN.search(text) or ordinary < 0.9:
        return "odd_characters"
    if not english(text):
        return "not_english"
    return None


def decide(line: str) -> tuple[str, str | None, str | None]:
    """(photo id, kept caption or None, drop reason or None) for one raw TSV line."""
    fields = line.rstrip("\r\n").split("\t")
    photo_id, title, description, marker = fields[1], clean(fields[8]), clean(fields[9]), fields[24]
    if marker != "0":
        return photo_id, None, "not_a_photo"
    reason = None
    for text in (description, title):
        reason = caption_reason(text)
        if reason is None:
            return photo_id, text, None
    return photo_id, None, reason
