"""The indexes readers need to open a build, written with the manifest: per source folder and for the whole build.

Per source folder: webdataset's `sizes.json` ({tar name: samples}, as open_clip reads it) and a wids
`shardindex.json`. At OUT: `sizes.json` keyed by the path under OUT, one wids index naming every tar, shard lists
(one path under OUT a line: every tar, and the tars of each training task) and, for a local OUT, the flat view
`_flat/pmd-NNNNN.tar`: links numbered across the build, with a `sizes.json` of their own, because open_clip looks
sizes up by file name in the first shard's folder and every source folder has its own 00000.tar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pmd_pipeline.storage import is_remote, remove_tree
from shards.files import atomic_write_bytes, atomic_write_json, owned_path
from shards.layout import FLAT_FOLDER, SHARD_LISTS, SIZES_FILE, WIDS_INDEX, flat_name
from sources import UNIMODAL

TASKS = ("pairs", "image", "text")  # the order of the lists and of the flat view: pairs first


@dataclass(frozen=True)
class Tar:
    source: str
    path: str  # under OUT: "coco/00000.tar"
    samples: int
    bytes: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


def task_of(source: str) -> str:
    return UNIMODAL.get(source, "pairs")


def ordered_sources(manifest: dict) -> list[str]:
    """Pairs sources first, then image-only, then text-only; by name within (the saved manifest's order)."""
    return sorted(manifest["sources"], key=lambda name: (TASKS.index(task_of(name)), name))


def build_tars(manifest: dict) -> list[Tar]:
    """Every tar the manifest lists, in ordered_sources' order and index order within a source."""
    files = [(name, f) for name in ordered_sources(manifest) for f in manifest["sources"][name]["shard_files"]]
    return [Tar(name, f["tar"], f["samples"], f["bytes"]) for name, f in files]


def write_build_indexes(out: Path, manifest: dict) -> None:
    tars = build_tars(manifest)
    for source in manifest["sources"]:
        write_source_indexes(out / source, [t for t in tars if t.source == source], within=out)
    atomic_write_json(out / SIZES_FILE, {t.path: t.samples for t in tars}, within=out)
    atomic_write_json(out / WIDS_INDEX, wids_index("pmd", [(t.path, t) for t in tars]), within=out)
    for task, file_name in SHARD_LISTS.items():
        listed = [t.path for t in tars if task in ("all", task_of(t.source))]
        atomic_write_bytes(out / file_name, "".join(f"{p}\n" for p in listed).encode(), within=out)
    if not is_remote(out):
        write_flat_view(out, tars)


def write_source_indexes(folder: Path, tars: list[Tar], within: Path) -> None:
    """webdataset sizes.json and a wids shard index with paths relative to the folder (it moves with it)."""
    if not tars:
        return
    atomic_write_json(folder / SIZES_FILE, {t.name: t.samples for t in tars}, within=within)
    atomic_write_json(folder / WIDS_INDEX, wids_index(folder.name, [(t.name, t) for t in tars]), within=within)


def wids_index(name: str, urls: list[tuple[str, Tar]]) -> dict:
    """The format `widsindex create` writes; relative URLs resolve against the index's folder. Empty tars are left
    out (wids has nothing to index in them)."""
    shardlist = [{"url": url, "nsamples": t.samples, "filesize": t.bytes} for url, t in urls if t.samples]
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shardlist}


def write_flat_view(out: Path, tars: list[Tar]) -> None:
    """OUT/_flat/pmd-NNNNN.tar -> ../<source>/NNNNN.tar (relative, so OUT can move), remade whole each time."""
    flat = owned_path(out, out / FLAT_FOLDER)
    remove_tree(flat)  # removes the links themselves, never what they point to
    flat.mkdir()
    for index, tar in enumerate(tars):
        os.symlink(Path("..", tar.path), flat / flat_name(index))
    atomic_write_json(flat / SIZES_FILE, {flat_name(i): t.samples for i, t in enumerate(tars)}, within=out)
