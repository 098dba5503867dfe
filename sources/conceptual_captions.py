"""Conceptual Captions 3M: headerless TSV `caption<TAB>url` (Train_GCC-training.tsv); caption unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import polars as pl

from pmd_pipeline.config import SourceConfig
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.tsv import read_tsv_lines

INFO = SourceInfo(
    name="conceptual_captions",
    title="Conceptual Captions 3M",
    raw_files="Train_GCC-training.tsv (headerless TSV: caption, url)",
    images_from="URLs (img2dataset)",
    rules="caption unchanged; one sample per unique URL with all its captions",
    license="free to use, per Google (images: their owners')",
    paper_pairs=3.1,
    paper_avg_words=10.3,
)


def url_key(prefix: str, url: str) -> str:
    """CC rows have no id: the image is identified by its URL, so the key is a hash of it."""
    return make_key(prefix, hashlib.sha1(url.encode("utf-8")).hexdigest()[:20])


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 50_000) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        batch = []
        for line_no, fields in read_tsv_lines(path, expected_fields=2, rejects=rejects):
            caption, url = fields
            batch.append(_candidate(caption, url, path.name, line_no))
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)


def _candidate(caption: str, url: str, file_name: str, line_no: int) -> dict:
    return {
        "key": url_key("cc3m", url),
        "source": INFO.name,
        "image_url": url,
        "captions": [caption],
        "caption_fields": ["caption"],
        "caption_mode": "all",
        "license": INFO.license,
        "meta": meta_json({"file": file_name, "line": line_no, "caption": caption, "url": url}),
    }


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
