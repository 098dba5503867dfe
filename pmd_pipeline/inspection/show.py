"""`pmd show`: print samples of a build and write their images and 14x14 token grids to a folder."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from pmd_pipeline.errors import PmdError
from shards.layout import (
    CODEBOOK_SIZE,
    IMAGE_EXT,
    JSON_EXT,
    PARQUET_SUFFIX,
    SAFE_NAME,
    TAR_SUFFIX,
    TEXT_EXT,
    TOKENS_EXT,
    shard_tars,
)
from shards.stats import source_names

GRID_CELL = 16  # px per token: a 14x14 grid becomes 224x224, the size of the stored image
# One fixed colour per code, so the same code looks the same in every grid.
PALETTE = np.random.default_rng(0).integers(0, 256, size=(CODEBOOK_SIZE, 3), dtype=np.uint8)
# C0/C1 controls (ESC starts sequences that retitle or clear the terminal; \x9b is a CSI by itself on some)
# and the bidi overrides that reorder what is shown: printed as escapes (\x1b, \u202e), never raw.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def run_show(out: Path, key: str | None, source: str | None, n: int, to: Path) -> list[dict]:
    if key is not None:
        if not SAFE_NAME.match(key):
            raise PmdError(f"{key!r} is not a sample key (keys are letters, digits, '_' and '-')")
        samples = [find_sample(out, key)]
    else:
        if n < 1:
            raise PmdError("--n must be at least 1")
        samples = list(first_samples(out, source or source_names(out)[0], n))
    to.mkdir(parents=True, exist_ok=True)
    console = Console()
    for sample in samples:
        files = write_sample_files(sample, to)
        console.print(Panel(describe(sample, files), title=shown(sample["__key__"]), title_align="left"))
    return samples


def find_sample(out: Path, key: str) -> dict:
    """The sample with this key: the shard parquets say which tar holds it, then only that tar is read."""
    names = source_names(out)
    parquets = [p for name in names for p in sorted((out / name).glob(f"[0-9]*{PARQUET_SUFFIX}"))]
    if not parquets:
        raise PmdError(f"{out} has no finished shards")
    hit = next((h for h in map(lambda p: _key_in(p, key), parquets) if h), None)
    if hit is None:
        raise PmdError(f"no sample {key!r} in {out}")
    status, reason, parquet = hit
    if status != "written":
        raise PmdError(f"{key!r} was not written: {status} ({reason})")
    tar = parquet.with_suffix(TAR_SUFFIX)
    for sample in read_tar_samples(tar):
        if sample["__key__"] == key:
            return sample
    raise PmdError(f"{key!r} is missing from {tar} although its parquet says written; run `pmd verify {out}`")


def _key_in(parquet: Path, key: str) -> tuple[str, str, Path] | None:
    """(status, reason, parquet) when this shard's parquet lists `key` (only its key column is read)."""
    with parquet.open("rb") as f:
        keys = pl.read_parquet(f, columns=["key"])["key"]
    if key not in keys:
        return None
    with parquet.open("rb") as f:
        row = pl.read_parquet(f, columns=["key", "status", "reason"]).filter(pl.col("key") == key).row(0)
    return row[1], row[2], parquet


def first_samples(out: Path, source: str, n: int) -> Iterator[dict]:
    source_names(out, source)  # a clear error for an unknown source
    tars = shard_tars(out / source)
    if not tars:
        raise PmdError(f"source {source!r} has no shards in {out}")
    shown = 0
    for tar in tars:
        for sample in read_tar_samples(tar):
            yield sample
            shown += 1
            if shown == n:
                return


def read_tar_samples(tar: Path) -> Iterator[dict]:
    """Samples of a tar in order, as {'__key__', 'source_tar', ext: bytes} (members of one key are adjacent)."""
    sample: dict = {}
    with tar.open("rb") as f, tarfile.open(fileobj=f) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample["source_tar"] = str(tar)
            sample[ext] = archive.extractfile(member).read()
    if sample:
        yield sample


def write_sample_files(sample: dict, to: Path) -> list[Path]:
    files = []
    key = sample["__key__"]
    if IMAGE_EXT in sample:
        files.append(to / f"{key}.jpg")
        files[-1].write_bytes(sample[IMAGE_EXT])
    if TOKENS_EXT in sample:
        files.append(to / f"{key}_tokens.png")
        token_grid_image(np.load(io.BytesIO(sample[TOKENS_EXT]), allow_pickle=False)).save(files[-1])
    return files


def token_grid_image(tokens: np.ndarray) -> Image.Image:
    """The 14x14 code grid as a 224x224 picture: one colour per code, so repeated codes are visible."""
    pixels = PALETTE[tokens.astype(np.int64)]
    return Image.fromarray(pixels, "RGB").resize(
        (tokens.shape[1] * GRID_CELL, tokens.shape[0] * GRID_CELL), Image.Resampling.NEAREST
    )


def shown(value) -> str:
    """A value from the data, safe to print: control characters made visible, rich markup escaped."""
    text = CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
    return escape(text)


def describe(sample: dict, files: list[Path]) -> str:
    """The sample as rich markup: every value in it came from the data, so each goes through shown()."""
    meta = json.loads(sample[JSON_EXT]) if JSON_EXT in sample else {}
    captions = meta.get("captions") or ([sample[TEXT_EXT].decode(errors="replace")] if TEXT_EXT in sample else [])
    lines = [f"[bold]source[/]   {shown(meta.get('source', Path(sample['source_tar']).parent.name))}"]
    lines += [f"[bold]caption[/]  {shown(c)}" for c in captions] or ["[bold]caption[/]  - (image only)"]
    lines.append(f"[bold]url[/]      {shown(meta.get('url') or meta.get('image_path') or '-')}")
    lines.append(f"[bold]licence[/]  {shown(meta.get('license') or '-')}")
    if IMAGE_EXT not in sample:  # text_corpus: no image, so no sizes to show
        lines.append("[bold]image[/]    none (a text-only sample)")
    elif meta.get("width"):  # 0 when the json has no image sizes (shards.schema: typed empty values)
        size = (
            f"stored {meta['width']}x{meta['height']}, original "
            f"{meta.get('original_width')}x{meta.get('original_height')}, crop {meta.get('crop_box') or '-'}"
        )
        lines.append(f"[bold]size[/]     {shown(size)}")
    if meta.get("label"):  # ImageNet-style classes: the folder's name, and KEY.cls its index
        lines.append(f"[bold]label[/]    {shown(meta['label'])} (class {shown(meta.get('cls'))})")
    tokens = "14x14 dVAE grid" if TOKENS_EXT in sample else "none"
    tokens += "" if IMAGE_EXT in sample else " (no image to tokenize)"
    lines.append(f"[bold]tokens[/]   {tokens}")
    lines.append(f"[bold]shard[/]    {shown(sample['source_tar'])}")
    lines += [f"[bold]wrote[/]    {shown(f)}" for f in files]
    return "\n".join(lines)
