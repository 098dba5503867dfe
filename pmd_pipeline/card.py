"""OUT/README.md: the Hugging Face dataset card, so `load_dataset(OUT)` and `load_dataset(OUT, "coco")` read the tars.

Its YAML names one config per source and `all` (the default), whose data files are only the source folders' tars
(never the parquet and json files beside them, nor the embedded sample's images), and declares the sample schema
(shards/schema.py) as every config's features: HF datasets then reads every source into one table instead of
inferring types from the first tar. The prose says what PMD is, where each source comes from and its licence, and
what the build holds.
"""

from __future__ import annotations

import yaml

from pmd_pipeline.indexes import ordered_sources, task_of
from shards.files import atomic_write_bytes
from shards.layout import CARD_FILE, TAR_SUFFIX
from shards.schema import hf_features
from sources import REGISTRY

ALL = "all"


def card_text(manifest: dict) -> str:
    sources = ordered_sources(manifest)
    return f"---\n{yaml.safe_dump(card_metadata(sources), sort_keys=False, width=120)}---\n\n{_prose(manifest)}"


def write_card(out, manifest: dict) -> None:
    atomic_write_bytes(out / CARD_FILE, card_text(manifest).encode(), within=out)


def card_metadata(sources: list[str]) -> dict:
    patterns = {name: f"{name}/*{TAR_SUFFIX}" for name in sources}  # a source folder's only tars are its shards
    every = {"config_name": ALL, "default": True, "data_files": [{"split": "train", "path": list(patterns.values())}]}
    configs = [every] + [{"config_name": n, "data_files": [{"split": "train", "path": p}]} for n, p in patterns.items()]
    features = hf_features()
    return {
        "pretty_name": "PMD (Public Multimodal Datasets), rebuilt with pmd-pipeline",
        "license": "other",  # one licence per source, listed in the card
        "task_categories": ["image-to-text", "text-to-image"],
        "configs": configs,
        "dataset_info": [{"config_name": c["config_name"], "features": features} for c in configs],
    }


def _prose(manifest: dict) -> str:
    rows = [_source_row(name, manifest["sources"][name]) for name in ordered_sources(manifest)]
    totals = manifest["totals"]
    return f"""# PMD, rebuilt

PMD (Public Multimodal Datasets) is the image-text corpus FLAVA was pretrained on (Singh et al., 2022): about 70M
image-text pairs from public sources, here rebuilt from the sources' published files as webdataset shards, with
ImageNet-style images and a text corpus for FLAVA's unimodal tasks where the build includes them.

This build holds **{totals["samples_written"]:,} samples** with **{totals["pairs_written"]:,} captions** (image-text
pairs, and the passages of text-only sources) in {totals["shards"]:,} shards (format version
{manifest["format_version"]}, config hash `{manifest["config_hash"]}`). Image tokens (`dvae.npy`):
{manifest["tokens"]["note"]}.

| config | source | task | samples | captions | licence |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Each licence is the source's; images keep their owners' rights. Use each part under its own terms.

## Loading

```python
from datasets import load_dataset

everything = load_dataset("path/to/this/folder", split="train")  # config "all": every source, one table
coco = load_dataset("path/to/this/folder", "coco", split="train")
```

A sample: `jpg` (224x224 JPEG; none for text-only samples), `txt` (the first caption), `json` (the same keys in
every source: key, source, captions, caption_fields, url, image_path, crop_box, license, original and stored sizes,
label, cls, and `meta`, the source's raw record as a JSON string), `cls` (class index, labelled images only) and
`dvae.npy` (14x14 uint16 DALL-E dVAE codes, once tokenized). `shards.txt` lists every tar (one path under this
folder a line; `shards_pairs.txt`, `shards_image.txt`, `shards_text.txt` per task), `sizes.json` and
`shardindex.json` (wids) cover the whole build, and each source folder has its own.
"""


def _source_row(name: str, entry: dict) -> str:
    source = REGISTRY.get(name)
    title, licence = (source.info.title, source.info.license) if source else (name, "see the source")
    counts = f"{entry['samples_written']:,} | {entry['pairs_written']:,}"
    return f"| `{name}` | {title} | {task_of(name)} | {counts} | {licence} |"
