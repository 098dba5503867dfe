"""The embedded default: a small PMD from a bundled sample of every source, images served on 127.0.0.1.

The raw metadata is committed in bundle/ (see make_bundle.py); the images are synthesised here,
deterministically, into OUT/_embedded: `mirror/<host>/<path>` for URL sources and zips for local ones.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pmd_pipeline.config import BuildConfig, SourceConfig

BUNDLE = Path(__file__).parent / "bundle"
MATERIALIZED_MARKER = ".materialized"


def default_config(out: str) -> BuildConfig:
    """The build `just build-pmd` runs: every bundled source, small shards so several shards run at once."""
    root = Path(out).resolve() / "_embedded"
    sources = [
        SourceConfig("conceptual_captions", metadata=[str(root / "conceptual_captions/Train_GCC-training.tsv")]),
        SourceConfig(
            "coco",
            metadata=[str(root / "coco/dataset_coco.json")],
            images={"train2014": str(root / "train2014.zip"), "val2014": str(root / "val2014.zip")},
        ),
    ]
    return BuildConfig(out=str(Path(out).resolve()), shard_size=64, sources=sources)


def materialize(out: str) -> Path:
    """Write the bundle's metadata, mirror images and zips under OUT/_embedded (once; later calls reuse it)."""
    root = Path(out).resolve() / "_embedded"
    if (root / MATERIALIZED_MARKER).exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("images.tsv"))
    zips: dict[str, list[tuple[str, bytes]]] = {}
    for line in (BUNDLE / "images.tsv").read_text().splitlines():
        place, *where, kind = line.split("\t")
        body = synth_body(kind, "/".join(where))
        if place == "mirror":
            target = root / "mirror" / where[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        else:
            zips.setdefault(where[0], []).append((where[1], body))
    for name, members in zips.items():
        with zipfile.ZipFile(root / name, "w", zipfile.ZIP_STORED) as z:
            for member, body in members:
                z.writestr(member, body)
    (root / MATERIALIZED_MARKER).write_text("ok\n")
    return root


def synth_body(kind: str, name: str) -> bytes:
    """A JPEG whose look and size derive from its name, or an HTML page for the 'served HTML' case."""
    if kind == "html":
        return b"<!doctype html><html><body>This image is no longer available</body></html>"
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(240, 640)), int(rng.integers(200, 480))
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, size=3)
    pixels = (base + 0.3 * x[..., None] * rng.random(3) + 0.3 * y[..., None] * rng.random(3)) % 255
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        pixels[y0 : y0 + int(rng.integers(20, 120)), x0 : x0 + int(rng.integers(20, 160))] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
