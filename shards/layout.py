"""Every name of a build's output: OUT/<source>/<NNNNN>.{tar,parquet,_stats.json,_dvae.json}, the plan, the manifest.

A shard is the unit of work and of resume. Its `_stats.json` is written last, atomically: a shard
whose stats file exists is finished, and a finished shard is never rewritten. Every file name, suffix
and member extension of the format is defined here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pmd_pipeline.storage import local_scratch

# Bump when the shard layout changes; part of the config hash and the manifest. 2: one KEY.json schema for every
# source (shards/schema.py), KEY.cls, and the build-wide indexes and dataset card.
FORMAT_VERSION = 2

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")

# Extensions of a sample's members in a tar (KEY.<ext>).
IMAGE_EXT = "jpg"
TEXT_EXT = "txt"  # the first caption
JSON_EXT = "json"  # all captions, source, url, licence, original size, meta
TOKENS_EXT = "dvae.npy"  # uint16 [14, 14] DALL-E dVAE codebook indices of exactly the stored pixels
CLASS_EXT = "cls"  # the class index as ASCII digits (webdataset / timm convention), for labelled images only

# The image tokens: DALL-E dVAE codebook indices on a 14x14 grid (224 px images, 16 px patches).
TOKEN_GRID = (14, 14)
CODEBOOK_SIZE = 8192

# Tar headers of every shard: fixed, so the same samples give the same bytes.
TAR_OWNER = "pmd"
TAR_MODE = 0o444

# A shard's files: NNNNN.tar and, beside it, the others.
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"  # every input row of the shard with its status and reason
STATS_SUFFIX = "_stats.json"  # written last by the shard stage: the completion marker
SIDECAR_SUFFIX = "_dvae.json"  # written last by the tokenize stage (codebook, counts, the rewritten tar's hash)
REJECTS_FILE = "_rejects.jsonl"  # OUT/<source>/: malformed raw records with file, line and reason

# Files and folders at the top of OUT.
CONFIG_FILE = "config.json"  # the resolved config and its hash: OUT belongs to this config
MANIFEST_FILE = "manifest.json"  # written when a build completes
PLAN_MARKER = "_plan.json"  # OUT/_plan/<source>/: the source is planned (rows, shards, rejects)
SIZES_FILE = "sizes.json"  # {tar: samples}: per source folder by tar name (open_clip), at OUT by path under OUT
WIDS_INDEX = "shardindex.json"  # the format `widsindex create` writes: per source folder, and at OUT for the build
# At OUT: one URL per line, relative to OUT, naming every tar (all) or the tars of one training task.
SHARD_LISTS = {"all": "shards.txt", "pairs": "shards_pairs.txt", "image": "shards_image.txt", "text": "shards_text.txt"}
CARD_FILE = "README.md"  # the Hugging Face dataset card: configs per source and `all`, naming only the tars
# OUT/_flat/pmd-NNNNN.tar: links to every tar, numbered across the build in shards.txt's order (pairs first), with
# its sizes.json keyed by those names, so open_clip's `{00000..N}` and `a::b` lists and size lookup work across
# sources. Local builds only: an object store has no links.
FLAT_FOLDER = "_flat"
FLAT_PREFIX = "pmd-"
LOCK_FILE = ".pmd.lock"  # held (flock) by the one run that may write OUT; left in place, never deleted
PLAN_FOLDER = "_plan"
WORK_FOLDER = "_work"  # scratch space of running shard tasks; removed when the build completes
DOWNLOADS_FOLDER = "_downloads"  # files a config names by URL, as <host>/<path> (pmd_pipeline.fetch.downloads)


@dataclass(frozen=True)
class ShardPaths:
    out: Path
    source: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def folder(self) -> Path:
        return self.out / self.source

    @property
    def tar(self) -> Path:
        return self.folder / f"{self.name}{TAR_SUFFIX}"

    @property
    def parquet(self) -> Path:
        return self.folder / f"{self.name}{PARQUET_SUFFIX}"

    @property
    def stats(self) -> Path:
        return self.folder / f"{self.name}{STATS_SUFFIX}"

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.name}{SIDECAR_SUFFIX}"

    @property
    def plan(self) -> Path:
        return plan_folder(self.out, self.source) / f"{self.name}{PARQUET_SUFFIX}"

    @property
    def work(self) -> Path:
        """Local scratch space for this shard (img2dataset's own input and stats files); removed when done.

        Under OUT for a local build; for a build into a bucket, a local folder of the node running the shard."""
        return local_scratch(self.out, WORK_FOLDER, self.source, self.name)

    def is_done(self) -> bool:
        return self.stats.exists()


def flat_name(index: int) -> str:
    return f"{FLAT_PREFIX}{index:05d}{TAR_SUFFIX}"


def plan_folder(out: Path, source: str) -> Path:
    return out / PLAN_FOLDER / source


def shard_tars(folder: Path) -> list[Path]:
    """The shard tars of a source folder, in index order (finished or not: see `finished_shards`)."""
    return sorted(folder.glob(f"[0-9]*{TAR_SUFFIX}"))


def finished_shards(out: Path) -> list[ShardPaths]:
    """Every finished shard of a build folder (the ones with a stats file), in source and index order."""
    shards = []
    for stats in sorted(out.glob(f"*/[0-9]*{STATS_SUFFIX}")):
        if not stats.parent.name.startswith("_"):
            shards.append(ShardPaths(out, stats.parent.name, int(stats.name.removesuffix(STATS_SUFFIX))))
    return shards


def check_safe_name(name: str, what: str = "name") -> str:
    """Names from the data become file and tar member names: no dots, separators or traversal."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"unsafe {what} {name!r}: only letters, digits, '_' and '-' are allowed")
    return name
