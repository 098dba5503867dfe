"""The Karpathy COCO split file, read for the contamination rule: COCO ids in `val` or `test`."""

from __future__ import annotations

from functools import lru_cache

from pmd_pipeline.archive_members import metadata_files
from pmd_pipeline.config import Flag, SourceConfig, Text
from pmd_pipeline.errors import PmdError
from sources.rawio import load_json

EVAL_SPLITS = ("val", "test")
# The options of a source with the contamination rule (declared in its Source.options).
CONTAMINATION_OPTIONS = {"karpathy_split_file": Text, "contamination_check": Flag}


def contamination_ids(cfg: SourceConfig) -> frozenset[int]:
    """COCO ids a source must drop, from options.karpathy_split_file; refuses to guess when it is missing.

    options.contamination_check = false turns the rule off explicitly (the build's config says so).
    """
    if cfg.options.get("contamination_check", True) is False:
        return frozenset()
    path = cfg.options.get("karpathy_split_file")
    if not path:
        raise PmdError(
            f"source {cfg.name}: set options.karpathy_split_file to dataset_coco.json, or to "
            "caption_datasets.zip::dataset_coco.json to read it in its zip (the contamination rule drops "
            "images in Karpathy's val/test splits), or options.contamination_check = false to skip the rule"
        )
    return _eval_ids(path, cfg.name)  # resolved when the config was read (a local path or a URL)


@lru_cache(maxsize=4)
def _eval_ids(path: str, source: str) -> frozenset[int]:
    files = metadata_files(path, f"source {source}: karpathy_split_file")  # a file, or a member of its zip
    if len(files) != 1:
        raise PmdError(f"source {source}: karpathy_split_file names {len(files)} files ({path}); it is one file")
    doc = load_json(files[0], source)
    try:
        return frozenset(int(img["cocoid"]) for img in doc["images"] if img["split"] in EVAL_SPLITS)
    except (KeyError, TypeError, ValueError):
        raise PmdError(f"source {source}: {path} is not a Karpathy split file (images[].cocoid/split)") from None
