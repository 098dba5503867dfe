"""Conceptual Captions 3M: headerless TSV `caption<TAB>url` (Train_GCC-training.tsv); caption unchanged.

Some mirrors ship the file with a third column (`caption, url, local_path`, the path of their own
download): that layout is read too, the third column ignored, decided per file (sources/tsv.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import SourceConfig
from sources.base import RejectLog, Source, SourceInfo, meta_json, require_files, url_key
from sources.tsv import read_tsv_batches

INFO = SourceInfo(
    name="conceptual_captions",
    title="Conceptual Captions 3M",
    raw_files="Train_GCC-training.tsv (headerless TSV: caption, url; mirrors' caption, url, local_path too)",
    images_from="URLs (img2dataset)",
    rules="caption unchanged; one sample per unique URL with all its captions",
    license="free to use, per Google (images: their owners')",
    paper_pairs=3.1,
    paper_avg_words=10.3,
)


LAYOUTS = (2, 3)  # caption, url; or caption, url, local_path


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    return read_tsv_batches(require_files(cfg), LAYOUTS, rejects, _candidate)


def _candidate(fields: list[str], path: Path, line_no: int) -> dict:
    caption, url = fields[:2]  # a mirror's third column (its local path) is not ours to keep
    return url_caption_row("cc3m", INFO, url, caption, path, line_no)


def url_caption_row(prefix: str, info: SourceInfo, url: str, caption: str, path: Path, line_no: int) -> dict:
    """The candidate of one `url, caption` record (Conceptual Captions 3M and 12M differ only in column order)."""
    return {
        "key": url_key(prefix, url),
        "source": info.name,
        "image_url": url,
        "captions": [caption],
        "caption_fields": ["caption"],
        "caption_mode": "all",
        "license": info.license,
        "meta": meta_json({"file": path.name, "line": line_no, "caption": caption, "url": url}),
    }


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
