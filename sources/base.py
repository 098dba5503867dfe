"""The contract every source module fulfils: what it is (SourceInfo) and how it reads raw metadata (read)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pmd_pipeline.archive_members import MemberPath, metadata_files
from pmd_pipeline.config import FilterConfig, SourceConfig, checked
from pmd_pipeline.errors import PmdError

# One candidate row per unique image (after cropping). `captions[i]` came from `caption_fields[i]`.
# caption_mode "all": every caption that passes the filters is kept.
# caption_mode "first_passing": captions are alternatives in priority order (YFCC: description, then title);
# the first one that passes the filters is the row's only caption.
CANDIDATE_SCHEMA = {
    "key": pl.Utf8,
    "source": pl.Utf8,
    "image_url": pl.Utf8,
    "image_path": pl.Utf8,  # a local file, or "archive.zip::member" / "archive.tar::member"
    "crop_box": pl.List(pl.Int64),  # [left, top, right, bottom] in original pixels, or null
    "captions": pl.List(pl.Utf8),
    "caption_fields": pl.List(pl.Utf8),
    "caption_mode": pl.Utf8,
    "license": pl.Utf8,
    "meta": pl.Utf8,  # the original raw record, as JSON
    "label": pl.Utf8,  # the class name of a labelled image (ImageNet's wnid folder), else null
    "cls": pl.Int64,  # that class's index (the shards' KEY.cls), else null
    "drop_reason": pl.Utf8,  # set when a source rule drops the row (e.g. karpathy_split_excluded), else null
}

# A sample key is `<source prefix>_<id part>`, made by make_key and nothing else (YFCC maps it over its id
# column), so every source follows one rule. An id that is already a safe name (letters, digits, '_', '-';
# at most MAX_ID_CHARS; no "--") is the id part as it is: COCO and YFCC numbers and URL hashes keep the
# keys they always had. Any other id is sanitised, shortened, and given "--" and a hash of the original id,
# so ids that differ only in unsafe characters (abc.1, abc-1, abc?1) or past the cut keep distinct keys.
# The two forms cannot meet: only the hashed one contains "--".
MAX_ID_CHARS = 120
SAFE_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_CHARS}}}")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
HASHED_MARK = "--"
KEPT_CHARS = 80  # of a sanitised id before its hash: still readable, and the key stays under 120 + prefix
HASH_CHARS = 20  # hex digits of sha1 (80 bits): a collision among a source's hashed ids is not a real risk


def make_key(source_prefix: str, original_id: str | int) -> str:
    """The sample key of a source's own id: stable across runs, unique per distinct id, a safe file name."""
    text = str(original_id)
    if SAFE_ID.fullmatch(text) and HASHED_MARK not in text:
        return f"{source_prefix}_{text}"
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{source_prefix}_{_UNSAFE_KEY_CHARS.sub('-', text)[:KEPT_CHARS]}{HASHED_MARK}{digest}"


def url_key(prefix: str, url: str) -> str:
    """Rows without an id (CC, SBU, WIT) are identified by their image URL: the id is a hash of it."""
    return make_key(prefix, hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:20])


@dataclass(frozen=True)
class SourceInfo:
    """What `pmd sources` and the README table show about a source."""

    name: str
    title: str
    raw_files: str
    images_from: str
    rules: str
    license: str
    paper_pairs: float  # millions of pairs in FLAVA's Table 2 (0 for unimodal sources)
    paper_avg_words: float
    # Sources the table gives one figure for together (Localized Narratives' four subsets): every member
    # carries the group's figure, and a total counts it once however many members are configured.
    paper_group: str = ""


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    raw: str


@dataclass
class RejectLog:
    """Malformed raw records: counted and kept aside with file and line; the build goes on."""

    rejects: list[Reject] = field(default_factory=list)

    def add(self, file: str | Path, line: int, reason: str, raw: str | bytes = "") -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        self.rejects.append(Reject(str(file), line, reason, raw[:2000]))

    def __len__(self) -> int:
        return len(self.rejects)

    def write_jsonl(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:  # a local file or an object in the output's bucket
            for r in self.rejects:
                f.write(json.dumps(r.__dict__, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Source:
    """A registered source: its description and its reader."""

    info: SourceInfo
    read: Callable[[SourceConfig, RejectLog], Iterator[pl.DataFrame]]
    repeats_keys: bool = False  # True when one image can appear on several raw rows (merge their captions)
    # The caption filters this source's rule names; None: the build's global `filters` list (by default
    # only empty captions are dropped: PMD's text filters are YFCC's, which declares them here).
    default_filters: tuple[FilterConfig, ...] | None = None
    needs_metadata: bool = True  # False for sources read from their images alone (an image folder)
    # Every `options` key the source reads, with its type (pmd_pipeline.config's annotated types); the
    # config refuses any other key, so a misspelt option cannot be ignored silently.
    options: dict[str, Any] = field(default_factory=dict)

    def check_options(self, cfg: SourceConfig) -> None:
        unknown = sorted(set(cfg.options) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none (this source takes no options)"
            where = f"config [sources.{cfg.name}]"
            raise PmdError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
        for name, value in cfg.options.items():
            checked(self.options[name], value, f"sources.{cfg.name}.options.{name}")


def candidates_frame(rows: list[dict]) -> pl.DataFrame:
    """Build a candidate batch with the exact contract schema (missing columns are null)."""
    columns = {name: [r.get(name) for r in rows] for name in CANDIDATE_SCHEMA}
    return pl.DataFrame(columns, schema=CANDIDATE_SCHEMA)


def require_files(cfg: SourceConfig, minimum: int = 1) -> list[Path | MemberPath]:
    """The source's metadata files, or a one-line error that names the missing one.

    Each entry is a local file or an object in a bucket (any fsspec URL), or a member of an archive read in
    place: `caption_datasets.zip::dataset_coco.json`, or a glob over members that stands for every match in
    name order (`redcaps_v1.0_annotations.zip::annotations/*.json`). A missing archive, a missing member and a
    glob that matches nothing are refused here, before any work."""
    paths = [p for entry in cfg.metadata for p in metadata_files(entry, f"source {cfg.name}")]
    if len(paths) < minimum:
        raise PmdError(f"source {cfg.name}: set `metadata` to its raw metadata file(s) in the config")
    return paths


def meta_json(record) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=False)
