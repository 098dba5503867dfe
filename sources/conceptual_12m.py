"""Conceptual 12M: headerless TSV `url<TAB>caption` (cc12m.tsv), with the `<PERSON>` token; caption unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import SourceConfig
from sources.base import RejectLog, Source, SourceInfo, require_files
from sources.conceptual_captions import url_caption_row
from sources.tsv import read_tsv_batches

INFO = SourceInfo(
    name="conceptual_12m",
    title="Conceptual Captions 12M",
    raw_files="cc12m.tsv (headerless TSV: url, caption)",
    images_from="URLs (img2dataset)",
    rules="caption unchanged (keeps <PERSON>); one sample per unique URL with all its captions",
    license="free to use, per Google (images: their owners')",
    paper_pairs=11.0,
    paper_avg_words=17.3,
)


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    return read_tsv_batches(require_files(cfg), 2, rejects, _candidate)


def _candidate(fields: list[str], path: Path, line_no: int) -> dict:
    url, caption = fields
    return url_caption_row("cc12m", INFO, url, caption, path, line_no)


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
