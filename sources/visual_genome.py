"""Visual Genome: region_descriptions.json (v1.2 `region_id/image_id`, or v1.0 `id/image`) joined with
image_data.json; one sample per region box, the image cropped to it, text = the phrase (stripped).

The regions file is 700 MB: it is streamed one image element at a time, out of its published zip in place
(`region_descriptions.json.zip::region_descriptions.json`, `image_data.json.zip::image_data.json`). Regions
of one image with the same box are one sample holding all their phrases (one sample per unique image after
cropping).
Contamination rule: images whose coco_id is in Karpathy's val/test are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import FilterConfig, SourceConfig
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json, require_files
from sources.karpathy import CONTAMINATION_OPTIONS, contamination_ids
from sources.rawio import iter_json_array, load_json

INFO = SourceInfo(
    name="visual_genome",
    title="Visual Genome",
    raw_files="region_descriptions.json (v1.2 or v1.0 layout) + image_data.json; read in their zips as "
    "region_descriptions.json.zip::region_descriptions.json and image_data.json.zip::image_data.json",
    images_from="local images.zip / images2.zip (VG_100K/, VG_100K_2/), cropped to each region",
    rules="one sample per region box, image cropped to (x, y, x+w, y+h); phrase stripped; "
    "drop images whose coco_id is in Karpathy val/test",
    license="CC BY 4.0",
    paper_pairs=5.4,
    paper_avg_words=5.1,
)
REGION_KEYS = {"v1.2": ("region_id", "image_id"), "v1.0": ("id", "image")}


def read(cfg: SourceConfig, rejects: RejectLog) -> Iterator[pl.DataFrame]:
    files = require_files(cfg, minimum=2)
    image_files = [p for p in files if p.name.startswith("image_data")]
    region_files = [p for p in files if p not in image_files]
    if not image_files or not region_files:
        raise PmdError(f"source {cfg.name}: metadata needs region_descriptions.json and image_data.json")
    images = _image_data(image_files, cfg.name)
    excluded = contamination_ids(cfg)
    for path in region_files:
        for index, element in iter_json_array(path, cfg.name, rejects):
            rows = _image_rows(element, images, excluded, cfg, path, index, rejects)
            if rows:
                yield candidates_frame(rows)


def _image_data(paths: list[Path], source: str) -> dict[int, dict]:
    images = {}
    for path in paths:
        doc = load_json(path, source)
        if not isinstance(doc, list):
            raise PmdError(f"source {source}: {path} must be a JSON array of images")
        for image in doc:
            if isinstance(image, dict) and "image_id" in image:
                images[int(image["image_id"])] = image
    return images


def _image_rows(element, images, excluded, cfg, path, index, rejects: RejectLog) -> list[dict]:
    regions = element.get("regions") if isinstance(element, dict) else None
    if not isinstance(regions, list):
        rejects.add(path, index, "bad_record:no_regions", repr(element)[:2000])
        return []
    by_box: dict[tuple, dict] = {}
    for region in regions:
        parsed = _region(region)
        if isinstance(parsed, str):
            rejects.add(path, index, parsed, repr(region))
            continue
        image_id, box, phrase = parsed
        image = images.get(image_id)
        if image is None:
            rejects.add(path, index, "image_not_in_image_data", repr(region))
            continue
        row = by_box.get((image_id, *box))
        if row is None:
            row = by_box[(image_id, *box)] = _row(image, box, cfg, excluded)
        row["captions"].append(phrase)
        row["caption_fields"].append("phrase")
        row["_regions"].append(region.get("region_id", region.get("id")))
    for row in by_box.values():
        row["meta"] = meta_json({"image": images[row.pop("_image_id")], "region_ids": row.pop("_regions")})
    return list(by_box.values())


def _region(region) -> tuple[int, list[int], str] | str:
    """(image_id, [left, top, right, bottom], phrase) or a reject reason."""
    if not isinstance(region, dict):
        return "bad_region:not_an_object"
    for _, image_key in REGION_KEYS.values():
        if image_key in region:
            break
    else:
        return "bad_region:no_image_id"
    try:
        x, y, w, h = (int(region[k]) for k in ("x", "y", "width", "height"))
        phrase = region["phrase"]
        if not isinstance(phrase, str):
            raise TypeError("phrase")
        return int(region[image_key]), [x, y, x + w, y + h], phrase.strip()
    except (KeyError, TypeError, ValueError) as err:
        return f"bad_region:{type(err).__name__}"


def _row(image: dict, box: list[int], cfg: SourceConfig, excluded: frozenset[int]) -> dict:
    image_id = int(image["image_id"])
    return {
        "key": make_key("vg", f"{image_id}_{box[0]}_{box[1]}_{box[2] - box[0]}_{box[3] - box[1]}"),
        "source": INFO.name,
        "image_path": _image_path(image, cfg),
        "crop_box": box,
        "captions": [],
        "caption_fields": [],
        "caption_mode": "all",
        "license": INFO.license,
        "drop_reason": "karpathy_contamination" if image.get("coco_id") in excluded else None,
        "_image_id": image_id,
        "_regions": [],
    }


def _image_path(image: dict, cfg: SourceConfig) -> str:
    """`<zip>::VG_100K_2/1.jpg`: the folder in the image's URL names the archive it is in."""
    folder, name = str(image.get("url", "")).rstrip("/").split("/")[-2:]
    if folder not in cfg.images:
        hint = f'set [sources.{cfg.name}.images] {folder} = "...zip"'
        raise PmdError(f"source {cfg.name}: images of {folder}/ need their zip; {hint}")
    return f"{cfg.images[folder]}::{folder}/{name}"


# Region phrases are short by nature (5.1 words on average in the paper): only empty phrases are dropped.
SOURCE = Source(
    info=INFO,
    read=read,
    repeats_keys=True,
    default_filters=(FilterConfig("caption_length", {"min_words": 1}),),
    options=CONTAMINATION_OPTIONS,
)
