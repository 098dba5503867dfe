"""Localized Narratives: jsonl, one narrative per line; each narrative split into sentences on ".",
each sentence one pair; one sample per image with the sentences of all its narratives.

Four registered sources, one per subset, because their images live in different places:
Open Images (URLs), COCO (local 2017 zips; Karpathy contamination rule), ADE20k (local zip) and
Flickr30k (local tarball; off unless its archive is given). `timed_caption` and `traces` are not
needed and may be missing (real rows lack `traces`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import polars as pl

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.karpathy import CONTAMINATION_OPTIONS, contamination_ids
from sources.rawio import numbered_lines
from sources.tsv import MAX_LINE_BYTES

REQUIRED = ("dataset_id", "image_id", "annotator_id", "caption")
OPEN_IMAGES_URL = "https://s3.amazonaws.com/open-images-dataset/{split}/{image_id}.jpg"


def split_sentences(caption: str) -> list[str]:
    """Split on "."; empty pieces dropped, each stripped and "." put back."""
    return [piece.strip() + "." for piece in caption.split(".") if piece.strip()]


def split_from_name(path: Path, names: dict[str, str], default: str) -> str:
    """The split a file holds, from its name (open_images_train_v6_..., coco_val_..., ade20k_train_...)."""
    for word, split in names.items():
        if re.search(rf"(^|_){word}(_|\.|$)", path.name):
            return split
    return default


def _open_images(cfg: SourceConfig, path: Path, image_id: str) -> dict:
    split = cfg.options.get("split") or split_from_name(
        path, {"train": "train", "validation": "validation", "test": "test"}, "train"
    )
    return {"image_url": OPEN_IMAGES_URL.format(split=split, image_id=image_id)}


def _coco(cfg: SourceConfig, path: Path, image_id: str) -> dict:
    role = split_from_name(path, {"train": "train2017", "val": "val2017"}, "train2017")
    return {"image_path": f"{_archive(cfg, role)}::{role}/{int(image_id):012d}.jpg"}


def _ade20k(cfg: SourceConfig, path: Path, image_id: str) -> dict:
    folder = split_from_name(path, {"train": "training", "validation": "validation", "val": "validation"}, "training")
    return {"image_path": f"{_archive(cfg, 'ade20k')}::ADEChallengeData2016/images/{folder}/{image_id}.jpg"}


def _flickr30k(cfg: SourceConfig, path: Path, image_id: str) -> dict:
    return {"image_path": f"{_archive(cfg, 'flickr30k')}::flickr30k-images/{image_id}.jpg"}


def _archive(cfg: SourceConfig, role: str) -> str:
    if role not in cfg.images:
        raise PmdError(f'source {cfg.name}: set [sources.{cfg.name}.images] {role} = "<path to the archive>"')
    return cfg.images[role]


def make_reader(subset: str, image_of: Callable, contamination: bool, batch_rows: int = 20_000):
    def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
        excluded = contamination_ids(cfg) if contamination else frozenset()
        for path in require_files(cfg):  # GBs of jsonl with traces: streamed in batches
            rows = []
            for line_no, record in _narratives(path, rejects):
                rows.append(_row(subset, cfg, path, line_no, record, image_of, excluded))
                if len(rows) >= batch_rows:
                    yield candidates_frame(rows)
                    rows = []
            if rows:
                yield candidates_frame(rows)

    return read


def _narratives(path: Path, rejects: RejectLog) -> Iterator[tuple[int, dict]]:
    for line_no, raw in numbered_lines(path, rejects):
        if not raw.strip():
            continue
        record, reason = _parse(raw)
        if reason:
            rejects.add(path, line_no, reason, raw[:2000])
        else:
            yield line_no, record


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    if len(raw) > MAX_LINE_BYTES * 16:  # traces make lines long; 16 MB is not a narrative
        return None, "line_too_long"
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except json.JSONDecodeError:
        return None, "json_error"
    if not isinstance(record, dict) or not all(k in record for k in REQUIRED):
        return None, "missing_field"
    if not isinstance(record["caption"], str):
        return None, "bad_record:TypeError"
    return record, None


def _row(subset, cfg, path, line_no, record, image_of, excluded) -> dict:
    image_id = str(record["image_id"])
    sentences = split_sentences(record["caption"])
    drop = None
    if excluded and int(image_id) in excluded:
        drop = "karpathy_contamination"
    return {
        "key": make_key(f"ln_{subset}", image_id),
        "source": f"localized_narratives__{subset}",
        **image_of(cfg, path, image_id),
        "captions": sentences,
        "caption_fields": ["caption_sentence"] * len(sentences),
        "caption_mode": "all",
        "license": LICENSE,
        "meta": meta_json({k: record[k] for k in REQUIRED} | {"file": path.name, "line": line_no}),
        "drop_reason": drop,
    }


LICENSE = "annotations CC BY 4.0; images: their datasets' licences"
SUBSETS = {  # subset: (images from, image placement, Karpathy contamination rule)
    "openimages": ("Open Images URLs (img2dataset)", _open_images, False),
    "coco": ("local COCO 2017 zips (train2017/val2017)", _coco, True),
    "ade20k": ("local ADEChallengeData2016 zip", _ade20k, False),
    "flickr30k": ("local flickr30k-images.tar.gz (manual download; off unless given)", _flickr30k, False),
}
# Open Images' own split folders; without the option the split comes from the file name.
OPTIONS = {"openimages": {"split": Literal["train", "validation", "test"]}, "coco": CONTAMINATION_OPTIONS}


def _source(subset: str) -> Source:
    images_from, image_of, contamination = SUBSETS[subset]
    info = SourceInfo(
        name=f"localized_narratives__{subset}",
        title=f"Localized Narratives ({subset})",
        raw_files=f"{subset}_*_localized_narratives*.jsonl (one narrative per line)",
        images_from=images_from,
        rules="narrative split into sentences on '.', each sentence one pair; one sample per image"
        + ("; drop Karpathy val/test COCO ids" if contamination else ""),
        license=LICENSE,
        paper_pairs=1.9,  # the paper gives the four subsets together: one figure, counted once in a total
        paper_avg_words=13.8,
        paper_group="localized_narratives",
    )
    read = make_reader(subset, image_of, contamination)
    return Source(info=info, read=read, repeats_keys=True, options=OPTIONS.get(subset, {}))


SOURCES = {f"localized_narratives__{subset}": _source(subset) for subset in SUBSETS}
