"""The embedded default: a small PMD from a bundled sample of every source, images served on 127.0.0.1.

The raw metadata is committed in bundle/ (see make_bundle.py); the images are synthesised here,
deterministically, into OUT/_embedded: `mirror/<host>/<path>` for URL sources and zips for local ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.embedded.packaging import published_files
from pmd_pipeline.storage import as_path, is_remote, local_scratch, upload, url_of
from shards.files import owned_path
from sources.published import ADE20K, CC3M, CC12M, COCO_ZIPS, KARPATHY, LN, REDCAPS, SBU, VG_IMAGES, VG_JSON, WIT

BUNDLE = Path(__file__).parent / "bundle"
MATERIALIZED_MARKER = ".materialized"
EMBEDDED_FOLDER = "_embedded"


def default_config(out: str) -> BuildConfig:
    """The build `just build-pmd` runs: every bundled source, small shards so several shards run at once.

    It is configs/pmd.toml's recipe at small scale: every published file is given by its canonical URL and
    served in its real packaging (the Karpathy zip, SBU's tar.gz, VG's zipped jsons, RedCaps' zip, gzipped
    WIT, COCO-style image zips) by the embedded mirror on 127.0.0.1, downloaded into OUT/_downloads and read
    in place; YFCC100M (a manual step in the recipe), ImageNet and the text corpus are local, in OUT/_embedded."""
    out = _out_url(out)
    root = f"{out}/{EMBEDDED_FOLDER}"
    karpathy = {"karpathy_split_file": f"{KARPATHY}::dataset_coco.json"}

    def source(name: str, *metadata: str, images: dict | None = None, options: dict | None = None) -> SourceConfig:
        return SourceConfig(name, metadata=list(metadata), images=images or {}, options=options or {})

    sources = [
        source(
            "coco",
            f"{KARPATHY}::dataset_coco.json",
            images={"train2014": f"{COCO_ZIPS}/train2014.zip", "val2014": f"{COCO_ZIPS}/val2014.zip"},
        ),
        source("sbu_captions", f"{SBU}::sbu-captions-all.json"),
        source(
            "localized_narratives__openimages", f"{LN}/open_images_train_v6_localized_narratives-00000-of-00010.jsonl"
        ),
        source(
            "localized_narratives__coco",
            f"{LN}/coco_train_localized_narratives.jsonl",
            images={"train2017": f"{COCO_ZIPS}/train2017.zip"},
            options=karpathy,
        ),
        source(
            "localized_narratives__ade20k",
            f"{LN}/ade20k_train_localized_narratives.jsonl",
            images={"ade20k": ADE20K},
        ),
        source("conceptual_captions", CC3M),
        source(
            "visual_genome",
            f"{VG_JSON}/region_descriptions.json.zip::region_descriptions.json",
            f"{VG_JSON}/image_data.json.zip::image_data.json",
            images={"VG_100K": f"{VG_IMAGES}/images.zip", "VG_100K_2": f"{VG_IMAGES}/images2.zip"},
            options=karpathy,
        ),
        source("wit", WIT.format(0)),
        source("conceptual_12m", CC12M),
        source("red_caps", f"{REDCAPS}::annotations/*.json"),
        source("yfcc100m", f"{root}/yfcc100m/yfcc100m_dataset"),
        source("imagenet", images={"root": f"{root}/imagenet_train.tar"}),
        source(
            "text_corpus", f"{root}/text_corpus/books.txt", f"{root}/text_corpus/news.jsonl", options={"max_words": 120}
        ),
    ]
    return BuildConfig(out=out, shard_size=64, sources=sources)


def _out_url(out: str) -> str:
    path = as_path(out)
    return url_of(path).rstrip("/") if is_remote(path) else str(path.resolve())


def materialize(out: str) -> Path:
    """Write the bundle's metadata, mirror images and zips under OUT/_embedded (once; later calls reuse it).

    Returns the local folder whose `mirror/` the embedded web server serves. For an OUT in a bucket the
    files are made in a local scratch folder and the inputs (not the mirror) uploaded to OUT/_embedded."""
    out_path = as_path(_out_url(out))
    root = local_scratch(out_path, EMBEDDED_FOLDER) if is_remote(out_path) else out_path / EMBEDDED_FOLDER
    if not _current(owned_path(out_path, root / MATERIALIZED_MARKER)):
        _materialize_locally(owned_path(out_path, root))  # removes a half-made copy first: inside OUT only
    if is_remote(out_path) and not _current(out_path / EMBEDDED_FOLDER / MATERIALIZED_MARKER):
        _publish(root, out_path / EMBEDDED_FOLDER)
    return root


def _current(marker: Path) -> bool:
    return marker.exists() and marker.read_text() == materialized_fingerprint()


@functools.cache
def materialized_fingerprint() -> str:
    """What the marker says: a digest of the bundle and of the code that turns it into files. A copy made from
    another bundle or by other code (a bucket's scratch folder outlives the run) is redone, never reused."""
    digest = hashlib.sha256()
    code = [Path(__file__), Path(__file__).with_name("packaging.py")]
    for path in [*sorted(p for p in BUNDLE.rglob("*") if p.is_file()), *code]:
        digest.update(path.relative_to(BUNDLE.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest() + "\n"


def _publish(root: Path, target: Path) -> None:
    """Upload the bundle's inputs to the bucket, the marker last (a killed upload is redone whole)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and "mirror" not in p.relative_to(root).parts)
    for path in files:
        if path.name != MATERIALIZED_MARKER:
            upload(path, target / path.relative_to(root).as_posix())
    upload(root / MATERIALIZED_MARKER, target / MATERIALIZED_MARKER)


def _materialize_locally(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("images.tsv"))
    archives: dict[str, list[tuple[str, bytes]]] = {}
    for line in (BUNDLE / "images.tsv").read_text().splitlines():
        place, *where, kind, look = line.split("\t")
        body = synth_body(kind, "/".join(where), look)
        if place == "mirror":
            target = root / "mirror" / where[0].split("?")[0]  # a static server ignores the query string
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        else:
            archives.setdefault(where[0], []).append((where[1], body))
    for name, members in archives.items():
        _write_archive(root / name, members)
    _package_for_the_mirror(root)
    (root / MATERIALIZED_MARKER).write_text(materialized_fingerprint())


# Where the mirror serves each file: its canonical URL (configs/pmd.toml's), https://host/path as mirror/host/path.
# The archives are made as their publishers package them (embedded/packaging.py); the rest are published
# as they are. The recipe's code path, at small scale.
PUBLISHED_AT = {
    "caption_datasets.zip": KARPATHY,
    "region_descriptions.json.zip": f"{VG_JSON}/region_descriptions.json.zip",
    "image_data.json.zip": f"{VG_JSON}/image_data.json.zip",
    "sbu-captions-all.tar.gz": SBU,
    "redcaps_v1.0_annotations.zip": REDCAPS,
    "wit_v1.train.all-00000-of-00010.tsv.gz": WIT.format(0),
}
AS_PUBLISHED = {  # bundle file (or image zip made above) -> its canonical URL
    "localized_narratives/open_images_train_v6_localized_narratives-00000-of-00010.jsonl": (
        f"{LN}/open_images_train_v6_localized_narratives-00000-of-00010.jsonl"
    ),
    "localized_narratives/coco_train_localized_narratives.jsonl": f"{LN}/coco_train_localized_narratives.jsonl",
    "localized_narratives/ade20k_train_localized_narratives.jsonl": f"{LN}/ade20k_train_localized_narratives.jsonl",
    "conceptual_captions/Train_GCC-training.tsv": CC3M,
    "conceptual_12m/cc12m.tsv": CC12M,
    "train2014.zip": f"{COCO_ZIPS}/train2014.zip",
    "val2014.zip": f"{COCO_ZIPS}/val2014.zip",
    "train2017.zip": f"{COCO_ZIPS}/train2017.zip",
    "ADEChallengeData2016.zip": ADE20K,
    "images.zip": f"{VG_IMAGES}/images.zip",
    "images2.zip": f"{VG_IMAGES}/images2.zip",
}
# Bundle files that exist only inside the archives above once packaged: the build never sees them unpacked
PACKED = ("coco", "visual_genome", "sbu_captions", "red_caps", "wit")


def served_locally(source_cfg: SourceConfig, root: Path) -> SourceConfig:
    """The source config reading the mirror's files in `root` (materialize's folder) instead of their URLs:
    for tests that read the published files without a server."""

    def local(entry):
        if not isinstance(entry, str) or "://" not in entry or entry.startswith(str(root)):
            return entry
        url, sep, member = entry.partition("::")
        return f"{root / 'mirror' / mirror_place(url)}{sep}{member}"

    return dataclasses.replace(
        source_cfg,
        metadata=[local(m) for m in source_cfg.metadata],
        images={k: local(v) for k, v in source_cfg.images.items()},
        options={k: local(v) for k, v in source_cfg.options.items()},
    )


def mirror_place(url: str) -> str:
    """Where the mirror serves `url` from: host/path (the query string is not part of a static file's name)."""
    return url.split("://", 1)[1].split("?", 1)[0]


def _package_for_the_mirror(root: Path) -> None:
    for name, data in published_files().items():
        _place(root, PUBLISHED_AT[name]).write_bytes(data)
    for local, url in AS_PUBLISHED.items():
        shutil.move(root / local, _place(root, url))  # the build reads it from its download, as a user's would
    for folder in PACKED:
        shutil.rmtree(root / folder)


def _place(root: Path, url: str) -> Path:
    target = root / "mirror" / mirror_place(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _write_archive(path: Path, members: list[tuple[str, bytes]]) -> None:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for member, body in members:
                z.writestr(member, body)
        return
    with tarfile.open(path, "w") as tar:
        for member, body in members:
            info = tarfile.TarInfo(member)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


# The looks the bundle's images are drawn in (make_bundle.py names them in every caption).
PALETTE = {
    "red": (210, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 210),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
}


# A pure function of its arguments: a process that materializes many OUTs (the test suite) draws each image once
# (about 15 ms each, 467 images: 7 s per OUT otherwise). The bytes are immutable, so sharing them is safe.
@functools.cache
def synth_body(kind: str, name: str, look: str = "") -> bytes:
    """A JPEG of its look ("red circle": a large red circle on a pale red ground; none: one derived from
    the name), its size and placement derived from its name; or an HTML page for the 'served HTML' case.

    The ground is a pale tint of the colour, so a region crop that misses the shape still shows it."""
    if kind == "html":
        return b"<!doctype html><html><body>This image is no longer available</body></html>"
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(240, 640)), int(rng.integers(200, 480))  # first: sizes stay as they were
    colour, shape = (look or _look_of(seed)).split(" ")
    rgb = np.array(PALETTE[colour])
    ground = (255 - 0.35 * (255 - rgb) + rng.normal(0, 6, (height, width, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(ground)
    side = min(width, height) * rng.uniform(0.5, 0.65)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * min(width, height)  # near the centre: the build's centre crop keeps it
    cy = height / 2 + rng.uniform(-0.1, 0.1) * min(width, height)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, side / 2, tuple(int(c) for c in rgb))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _look_of(seed: int) -> str:
    shapes = ("circle", "square", "triangle", "cross")
    return f"{list(PALETTE)[seed % len(PALETTE)]} {shapes[seed // len(PALETTE) % len(shapes)]}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        bar = r * 0.3
        draw.rectangle((cx - r, cy - bar, cx + r, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - r, cx + bar, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
