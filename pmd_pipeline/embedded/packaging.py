"""The embedded bundle in each source's published packaging: the files a full rebuild downloads, small.

COCO's Karpathy split ships as `caption_datasets.zip` (beside Flickr8k's and Flickr30k's split files), Visual
Genome's jsons each in a zip of its own, SBU's json in `sbu-captions-all.tar.gz`, RedCaps' annotations as
`annotations/<subreddit>_<year>.json` members of one zip (most of them empty, as in the real release) and
WIT as `.tsv.gz`; the other sources publish plain files. PUBLISHED_METADATA is how a config names each one in
place (`archive::member`, a glob for RedCaps). The bytes are deterministic (fixed times, no owner names), so
a mirror serving them has stable sizes and checksums.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

BUNDLE = Path(__file__).parent / "bundle"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
KARPATHY_SPLIT = "caption_datasets.zip::dataset_coco.json"

# source: the metadata entries of its published files, relative to the folder they are in.
PUBLISHED_METADATA: dict[str, list[str]] = {
    "coco": [KARPATHY_SPLIT],
    "visual_genome": [
        "region_descriptions.json.zip::region_descriptions.json",
        "image_data.json.zip::image_data.json",
    ],
    "sbu_captions": ["sbu-captions-all.tar.gz::sbu-captions-all.json"],
    "red_caps": ["redcaps_v1.0_annotations.zip::annotations/*.json"],
    "wit": ["wit_v1.train.all-00000-of-00010.tsv.gz"],
}
# Options that name a published file (the contamination rule's split file), by source.
PUBLISHED_OPTIONS: dict[str, dict[str, str]] = {"visual_genome": {"karpathy_split_file": KARPATHY_SPLIT}}

_EMPTY_REDCAPS = ("abandoned_2018", "abandoned_2019", "itookapicture_2017", "itookapicture_2018")


def published_files() -> dict[str, bytes]:
    """File name -> bytes of every published archive (and the gzipped WIT file) made from the bundle."""
    bundle = BUNDLE
    redcaps = {
        f"annotations/{p.name}": p.read_bytes() for p in sorted((bundle / "red_caps/annotations").glob("*.json"))
    }
    redcaps |= {f"annotations/{name}.json": b'{"annotations": []}' for name in _EMPTY_REDCAPS}
    return {
        "caption_datasets.zip": zip_bytes(
            {
                "dataset_coco.json": (bundle / "coco/dataset_coco.json").read_bytes(),
                "dataset_flickr8k.json": _empty_split("flickr8k"),
                "dataset_flickr30k.json": _empty_split("flickr30k"),
            }
        ),
        "region_descriptions.json.zip": zip_bytes(
            {"region_descriptions.json": (bundle / "visual_genome/region_descriptions.json").read_bytes()}
        ),
        "image_data.json.zip": zip_bytes({"image_data.json": (bundle / "visual_genome/image_data.json").read_bytes()}),
        "sbu-captions-all.tar.gz": tar_gz_bytes(
            {"sbu-captions-all.json": (bundle / "sbu_captions/sbu-captions-all.json").read_bytes()}
        ),
        "redcaps_v1.0_annotations.zip": zip_bytes(dict(sorted(redcaps.items())), folders=("annotations/",)),
        "wit_v1.train.all-00000-of-00010.tsv.gz": (bundle / "wit/wit_v1.train.all-00000-of-00010.tsv.gz").read_bytes(),
    }


def write_published(folder: Path) -> dict[str, list[str]]:
    """Write the published files into `folder`; returns each source's metadata entries, with folder's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in published_files().items():
        (folder / name).write_bytes(data)
    return {source: [f"{folder}/{entry}" for entry in entries] for source, entries in PUBLISHED_METADATA.items()}


def zip_bytes(members: dict[str, bytes], folders: tuple[str, ...] = (), stored: bool = False) -> bytes:
    """A zip of `members` (deflated, or stored), with folder entries first as `zip -r` writes them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for folder in folders:
            z.writestr(zipfile.ZipInfo(folder, ZIP_TIME), b"")
        for name, data in members.items():
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes], prefix: str = "") -> bytes:
    """A gzipped tar of `members` (names after `prefix`: `./` as `tar -C dir .` writes them), mtime 0."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _empty_split(dataset: str) -> bytes:
    return json.dumps({"images": [], "dataset": dataset}).encode()
