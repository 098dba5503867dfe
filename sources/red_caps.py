"""RedCaps: annotation files `{info, annotations: [...]}` (info may be absent); text = `raw_caption`.

Published as `redcaps_v1.0_annotations.zip`: the metadata entry `redcaps_v1.0_annotations.zip::annotations/*.json`
reads every annotation file in the zip in place, in name order."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.rawio import load_json

INFO = SourceInfo(
    name="red_caps",
    title="RedCaps",
    raw_files="annotations/<subreddit>_<year>.json ({info, annotations: [...]}); every one read in its zip as "
    "redcaps_v1.0_annotations.zip::annotations/*.json",
    images_from="Reddit / imgur URLs (img2dataset)",
    rules="text = raw_caption (not the cleaned `caption`); one sample per image_id",
    license="annotations CC BY 4.0; images: their Reddit posters'",
    paper_pairs=11.6,
    paper_avg_words=9.5,
)
REQUIRED = ("image_id", "url", "raw_caption")


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        doc = load_json(path, cfg.name, rejects)
        if doc is None:  # a damaged member or file: one reject, the other annotation files are still read
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise PmdError(f"source {cfg.name}: {path} is not a RedCaps annotation file ({{info, annotations}})")
        rows = []
        for index, ann in enumerate(doc["annotations"], start=1):
            if not isinstance(ann, dict) or not all(isinstance(ann.get(k), str) for k in REQUIRED):
                rejects.add(path, index, "bad_record:missing_field", repr(ann))
                continue
            rows.append(
                {
                    "key": make_key("redcaps", ann["image_id"]),
                    "source": INFO.name,
                    "image_url": ann["url"],
                    "captions": [ann["raw_caption"]],
                    "caption_fields": ["raw_caption"],
                    "caption_mode": "all",
                    "license": INFO.license,
                    "meta": meta_json(ann),
                }
            )
        if rows:
            yield candidates_frame(rows)


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
