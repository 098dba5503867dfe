"""COCO captions: the Karpathy split file (train + restval kept) or the official captions_*.json; local zips."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import SourceConfig, Text
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.rawio import load_json

INFO = SourceInfo(
    name="coco",
    title="COCO",
    raw_files="dataset_coco.json (Karpathy split; read in its zip as caption_datasets.zip::dataset_coco.json) "
    "or captions_{train,val}{2014,2017}.json (annotations_trainval2014.zip::annotations/captions_train2014.json)",
    images_from="local COCO zips (train2014.zip, val2014.zip, or 2017)",
    rules="Karpathy: splits train + restval only, text = sentence `raw`; one sample per image, all sentences",
    license="annotations CC BY 4.0; images: their Flickr licences",
    paper_pairs=0.9,
    paper_avg_words=12.4,
)

DEFAULT_SPLITS = ("train", "restval")
_ROLE_IN_NAME = re.compile(r"(train|val|test)(2014|2015|2017)")


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    for path in require_files(cfg):
        doc = load_json(path, cfg.name, rejects)
        if doc is None:  # a damaged compressed file: one reject, the other files are still read
            continue
        if _is_karpathy(doc):
            yield candidates_frame(list(_karpathy_rows(doc, cfg, path, rejects)))
        elif _is_official(doc):
            yield candidates_frame(list(_official_rows(doc, cfg, path, rejects)))
        else:
            raise PmdError(
                f"source coco: {path} is neither a Karpathy split file (images[].sentences) "
                "nor an official captions file (images + annotations)"
            )


def _is_karpathy(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("images"), list) and "annotations" not in doc


def _is_official(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)


def _karpathy_rows(doc: dict, cfg: SourceConfig, path: Path, rejects: RejectLog) -> Iterator[dict]:
    keep = set(cfg.options.get("splits", DEFAULT_SPLITS))
    for index, image in enumerate(doc["images"], start=1):
        try:
            filename, cocoid, split = image["filename"], int(image["cocoid"]), image["split"]
            sentences = [s["raw"] for s in image["sentences"]]
            if not isinstance(filename, str) or not all(isinstance(s, str) for s in sentences):
                raise TypeError("filename and sentences[].raw must be strings")
        except (KeyError, TypeError, ValueError) as err:
            rejects.add(path, index, f"bad_record:{type(err).__name__}", json.dumps(image)[:2000])
            continue
        row = _row(cocoid, filename, image.get("filepath"), sentences, cfg, {**image, "sentences": sentences})
        if split not in keep:
            row["drop_reason"] = "karpathy_split_excluded"
        yield row


def _official_rows(doc: dict, cfg: SourceConfig, path: Path, rejects: RejectLog) -> Iterator[dict]:
    """Official format: captions live in `annotations`, joined to `images` by image_id."""
    captions: dict[int, list[str]] = {}
    images = {}
    for index, image in enumerate(doc["images"], start=1):
        try:
            images[int(image["id"])] = image
            str(image["file_name"])
        except (KeyError, TypeError, ValueError) as err:
            rejects.add(path, index, f"bad_image_record:{type(err).__name__}", json.dumps(image)[:2000])
    for index, ann in enumerate(doc["annotations"], start=1):
        try:
            image_id, caption = int(ann["image_id"]), ann["caption"]
            if not isinstance(caption, str):
                raise TypeError("caption must be a string")
        except (KeyError, TypeError, ValueError) as err:
            rejects.add(path, index, f"bad_annotation:{type(err).__name__}", json.dumps(ann)[:2000])
            continue
        if image_id not in images:
            rejects.add(path, index, "annotation_without_image", json.dumps(ann)[:2000])
            continue
        captions.setdefault(image_id, []).append(caption)
    role_in_name = _ROLE_IN_NAME.search(path.name)
    for image_id, image in images.items():
        if image_id in captions:
            role = role_in_name.group(0) if role_in_name else None
            yield _row(image_id, image["file_name"], role, captions[image_id], cfg, image)


def _row(cocoid: int, filename: str, filepath: str | None, captions: list[str], cfg: SourceConfig, record) -> dict:
    return {
        "key": make_key("coco", cocoid),
        "source": INFO.name,
        "image_path": _image_path(filename, filepath, cfg),
        "captions": captions,
        "caption_fields": ["raw"] * len(captions),
        "caption_mode": "all",
        "license": INFO.license,
        "meta": meta_json(record),
    }


def _image_path(filename: str, filepath: str | None, cfg: SourceConfig) -> str:
    """The image's place: `<zip>::<role>/<filename>`, the role (train2014, val2014, ...) from the file name."""
    match = _ROLE_IN_NAME.search(filename)
    role = match.group(0) if match else filepath
    if role not in cfg.images:
        raise PmdError(
            f'source coco: image {filename} needs the `{role}` archive; set [sources.coco.images] {role} = "...zip"'
        )
    return f"{cfg.images[role]}::{role}/{filename}"


SOURCE = Source(info=INFO, read=read, options={"splits": list[Text]})
