"""Conceptual 12M: headerless TSV `url<TAB>caption` (cc12m.tsv), with the `<PERSON>` token; caption unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from pmd_pipeline.config import SourceConfig
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, meta_json, require_files
from sources.conceptual_captions import url_key
from sources.tsv import read_tsv_lines

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


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 50_000) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        batch = []
        for line_no, (url, caption) in read_tsv_lines(path, expected_fields=2, rejects=rejects):
            batch.append(
                {
                    "key": url_key("cc12m", url),
                    "source": INFO.name,
                    "image_url": url,
                    "captions": [caption],
                    "caption_fields": ["caption"],
                    "caption_mode": "all",
                    "license": INFO.license,
                    "meta": meta_json({"file": path.name, "line": line_no, "url": url, "caption": caption}),
                }
            )
            if len(batch) >= batch_rows:
                yield candidates_frame(batch)
                batch = []
        if batch:
            yield candidates_frame(batch)


SOURCE = Source(info=INFO, read=read, repeats_keys=True)
