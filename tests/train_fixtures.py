"""Tiny shards in the exact built format (tar + stats + dVAE sidecar) with random but learnable content.

Images are flat colours with noise, captions name the colour, and dVAE tokens are drawn from a few codes
per colour: so every loss has something to learn and can fall below its chance value in a few steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 40)}
CODEBOOK = "random, seed 0"
WORDS = "a photo of the small big old new dog cat car tree house on in with".split()


def make_shards(root: Path, kind: str, source: str, shards: int = 1, per_shard: int = 16, **options) -> Path:
    """Write `shards` finished shards of one source: kind is 'pairs', 'image' or 'text'."""
    folder = Path(root) / source
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(f"{source}:{kind}".encode()))
    for shard in range(shards):
        samples = [_sample(rng, kind, source, f"{source}_{shard:05d}_{i:04d}") for i in range(per_shard)]
        write_shard(folder / f"{shard:05d}", samples, kind, **options)
    return folder


def write_shard(stem: Path, samples: list[dict], kind: str, tokens: bool = True, codebook: str = CODEBOOK) -> None:
    tar_path = stem.with_suffix(".tar")
    with tarfile.open(tar_path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = {"shard": stem.name, "samples_written": len(samples), "tar_sha256": _sha(tar_path)}
    stem.with_name(f"{stem.name}_stats.json").write_text(json.dumps(stats))
    if tokens and kind != "text":
        sidecar = {
            "codebook": codebook,
            "codebook_random": codebook.startswith("random"),
            "samples_tokenized": len(samples),
            "samples_failed": 0,
            "failure_reasons": {},
            "code_counts": [0] * 8192,
            "tar_sha256": _sha(tar_path),
            "tar_bytes": tar_path.stat().st_size,
            "seconds": 0.0,
        }
        stem.with_name(f"{stem.name}_dvae.json").write_text(json.dumps(sidecar))


def _sample(rng: np.random.Generator, kind: str, source: str, key: str) -> dict:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    caption = f"a {colour} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 8)))
    sample = {"__key__": key}
    if kind in ("pairs", "text"):
        sample["txt"] = caption.encode()
    if kind in ("pairs", "image"):
        sample["jpg"] = _jpeg(rng, COLOURS[colour])
        sample["dvae.npy"] = _tokens(rng, list(COLOURS).index(colour))
    meta = {"source": source, "captions": [caption] if kind != "image" else [], "meta": {"label": colour}}
    sample["json"] = json.dumps(meta).encode()
    return sample


def _jpeg(rng: np.random.Generator, rgb: tuple[int, int, int]) -> bytes:
    pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (224, 224, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _tokens(rng: np.random.Generator, colour_index: int) -> bytes:
    codes = rng.choice(np.arange(colour_index * 8, colour_index * 8 + 8), size=(14, 14)).astype(np.uint16)
    buffer = io.BytesIO()
    np.save(buffer, codes)
    return buffer.getvalue()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_pmd(root: Path, per_shard: int = 16, shards: int = 2, **options) -> Path:
    """A small build folder: two pair sources, an image-only and a text-only source."""
    make_shards(root, "pairs", "cc3m", shards, per_shard, **options)
    make_shards(root, "pairs", "coco", shards, per_shard, **options)
    make_shards(root, "image", "imagenet", shards, per_shard, **options)
    make_shards(root, "text", "text_corpus", shards, per_shard, **options)
    return root


def make_tagged_shards(root: Path, source: str, sizes: list[int], first_id: int, captions: int = 1, crops: int = 1):
    """Paired shards whose samples can be told apart in a batch: every dVAE token of sample i is i.

    sizes: samples per shard; captions: up to this many captions per sample (1, 2, ... cycling);
    crops > 1: region crops, `crops` consecutive samples cut from one image, keyed as Visual Genome keys them.
    Returns {id: (key, source, image group, [captions])}.
    """
    folder = Path(root) / source
    folder.mkdir(parents=True, exist_ok=True)
    rng, made, sample_id = np.random.default_rng(first_id), {}, first_id
    image = _jpeg(rng, COLOURS["red"])
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            group = f"{source}_{sample_id // crops}"
            key = f"{group}_{sample_id % crops}_0_10_10" if crops > 1 else f"{source}_{sample_id}"
            count = 1 + sample_id % captions
            texts = [f"a {' '.join(rng.choice(WORDS, size=4))} {sample_id} {n}" for n in range(count)]
            tokens = io.BytesIO()
            np.save(tokens, np.full((14, 14), sample_id, np.uint16))
            meta = {"source": source, "captions": texts}
            samples.append({"__key__": key, "jpg": image, "dvae.npy": tokens.getvalue(),
                            "txt": texts[0].encode(), "json": json.dumps(meta).encode()})  # fmt: skip
            made[sample_id] = (key, source, group if crops > 1 else key, texts)
            sample_id += 1
        write_shard(folder / f"{shard:05d}", samples, "pairs")
    return made
