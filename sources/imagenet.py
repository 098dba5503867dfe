"""Unimodal images: an ImageNet-1k style folder (`train/<wnid>/<file>.JPEG`) or any image folder or tar.

Image-only samples (no caption) for masked image modeling; the class folder is kept as the label, and its
index among the sorted class folders (torchvision ImageFolder's rule: ImageNet-1k's wnids give 0..999) as `cls`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from pmd_pipeline.storage import as_path, url_of
from sources.base import RejectLog, Source, SourceInfo, candidates_frame, make_key, meta_json

INFO = SourceInfo(
    name="imagenet",
    title="ImageNet-style images (unimodal)",
    raw_files="an image folder (train/<wnid>/<file>.JPEG) or a tar of one; set `images.root`",
    images_from="local folder or tar",
    rules="image-only samples for MIM; label = the class folder",
    license="ImageNet terms of access (research, non-commercial)",
    paper_pairs=0,
    paper_avg_words=0,
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def read(cfg: SourceConfig, rejects: RejectLog, batch_rows: int = 20_000) -> Iterator[pl.DataFrame]:
    root = cfg.images.get("root")
    if not root:
        raise PmdError(f'source {cfg.name}: set [sources.{cfg.name}.images] root = "<image folder or .tar>"')
    # Listed whole before the first row: a class's index needs every class (the listing is sorted anyway).
    members = list(_tar_members(as_path(root)) if as_path(root).is_file() else _folder_files(as_path(root)))
    labels = sorted({_label(relative) for relative, _ in members} - {None})
    classes = {label: index for index, label in enumerate(labels)}
    for start in range(0, len(members), batch_rows):
        batch = members[start : start + batch_rows]
        yield candidates_frame([_row(relative, path, classes) for relative, path in batch])


def _folder_files(root: Path) -> Iterator[tuple[str, str]]:
    if not root.is_dir():
        raise PmdError(f"source imagenet: image folder not found: {root}")
    for path in sorted(root.rglob("*")):  # sorted: the same keys in the same order on every run
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path.relative_to(root).as_posix(), url_of(path)


def _tar_members(root: Path) -> Iterator[tuple[str, str]]:
    try:
        with root.open("rb") as f, tarfile.open(fileobj=f) as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
    except tarfile.TarError as err:
        raise PmdError(f"source imagenet: {root} is not a readable tar ({err})") from None
    for name in names:
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            yield name, f"{url_of(root)}::{name}"


def _label(relative: str) -> str | None:
    """The class folder an image lies in (None for an image at the root)."""
    parts = Path(relative).parts
    return parts[-2] if len(parts) >= 2 else None


def _row(relative: str, image_path: str, classes: dict[str, int]) -> dict:
    label = _label(relative)
    return {
        "key": make_key("imagenet", Path(relative).as_posix()),  # the whole path: a/b_c.jpg and a_b/c.png differ
        "source": INFO.name,
        "image_path": image_path,
        "captions": [],
        "caption_fields": [],
        "caption_mode": "image_only",
        "license": INFO.license,
        "meta": meta_json({"file": relative, "label": label}),
        "label": label,
        "cls": classes.get(label),
    }


SOURCE = Source(info=INFO, read=read, default_filters=(), needs_metadata=False)
