"""SBU Captions: `sbu-captions-all.json`, one object of parallel lists image_urls, user_ids, captions.

Published as `sbu-captions-all.tar.gz`: the metadata entry `sbu-captions-all.tar.gz::sbu-captions-all.json`
streams the member out of the tarball in place."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, meta_json, require_files, url_key
from sources.rawio import load_json

INFO = SourceInfo(
    name="sbu_captions",
    title="SBU Captions",
    raw_files="sbu-captions-all.json (object of parallel lists image_urls, user_ids, captions); read in its "
    "tarball as sbu-captions-all.tar.gz::sbu-captions-all.json",
    images_from="Flickr URLs (img2dataset)",
    rules="caption unchanged; one sample per unique URL",
    license="research use (images: their Flickr owners')",
    paper_pairs=1.0,
    paper_avg_words=12.1,
)
LISTS = ("image_urls", "user_ids", "captions")


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 50_000) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        doc = load_json(path, cfg.name, rejects)
        if doc is None:  # a damaged compressed file: one reject
            continue
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in LISTS):
            raise PmdError(f"source {cfg.name}: {path} must be an object with the lists {', '.join(LISTS)}")
        urls, users, captions = (doc[k] for k in LISTS)
        if not len(urls) == len(users) == len(captions):
            raise PmdError(
                f"source {cfg.name}: {path} has lists of different lengths "
                f"({len(urls)} urls, {len(users)} user ids, {len(captions)} captions): they cannot be paired"
            )
        batch = []
        for index, (url, user, text) in enumerate(zip(urls, users, captions, strict=True), start=1):
            if not isinstance(url, str) or not isinstance(text, str):
                rejects.add(path, index, "bad_record:TypeError", repr((url, user, text)))
                continue
            batch.append(_candidate(url, user, text, index))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)


def _candidate(url: str, user, text: str, index: int) -> dict:
    return {
        "key": url_key("sbu", url),
        "source": INFO.name,
        "image_url": url,
        "captions": [text],
        "caption_fields": ["caption"],
        "caption_mode": "all",
        "license": INFO.license,
        "meta": meta_json({"index": index, "user_id": user, "caption": text, "url": url}),
    }


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
