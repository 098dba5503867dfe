"""Regenerate the embedded sample's raw metadata (committed in bundle/): `python -m pmd_pipeline.embedded.make_bundle`.

Every file is in its source's real raw format, with the awkward cases a real build meets: repeated URLs,
dead links, HTML served as an image, short captions, a malformed line, excluded Karpathy splits and a
missing archive member. images.tsv lists the images `materialize` synthesises for the local mirror and zips.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BUNDLE = Path(__file__).parent / "bundle"
SEED = 20221

ADJECTIVES = ["red", "small", "old", "bright", "wooden", "quiet", "busy", "snowy", "green", "tall", "empty", "sunny"]
NOUNS = ["dog", "bicycle", "house", "boat", "train", "woman", "man", "child", "cat", "bus", "tree", "bridge"]
VERBS = ["standing", "waiting", "resting", "parked", "sitting", "walking", "shown", "lying"]
PLACES = ["street", "beach", "park", "kitchen", "harbour", "field", "station", "garden", "market", "river"]


def caption(rng: random.Random) -> str:
    return (
        f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"near the {rng.choice(ADJECTIVES)} {rng.choice(PLACES)}"
    )


def make_cc3m(rng: random.Random, images: list[str]) -> str:
    """200 rows of `caption<TAB>url`, plus duplicates, dead links, HTML bodies, short captions, bad lines."""
    lines = []
    for i in range(200):
        url = f"https://img{i % 3}.cc3m-sample.invalid/photos/{i:04d}.jpg"
        text = caption(rng) if i % 25 else rng.choice(["sunset", "my dog"])  # 8 too short
        lines.append(f"{text}\t{url}")
        kind = "missing" if i % 33 == 7 else "html" if i % 97 == 5 else "jpg"
        if kind != "missing":
            images.append(f"mirror\timg{i % 3}.cc3m-sample.invalid/photos/{i:04d}.jpg\t{kind}")
    lines.insert(40, f"{caption(rng)}\thttps://img1.cc3m-sample.invalid/photos/0010.jpg")  # same image twice
    lines.insert(90, "a caption without its url column")  # malformed: one column
    lines.insert(120, f"{caption(rng)}\tftp://files.cc3m-sample.invalid/photo.jpg")  # not http(s)
    return "\n".join(lines) + "\n"


def make_coco(rng: random.Random, images: list[str]) -> str:
    """A Karpathy dataset_coco.json: 70 images, splits train/restval (kept) and val/test (excluded)."""
    entries = []
    for i in range(70):
        cocoid = 100_000 + i * 37
        folder = "train2014" if i % 2 else "val2014"
        split = "test" if i % 10 == 3 else "val" if i % 10 == 6 else "restval" if folder == "val2014" else "train"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        texts = [caption(rng) for _ in range(5)]
        if i % 7 == 0:
            texts[4] = "two words"
        sentences = [{"tokens": t.split(), "raw": t, "imgid": i, "sentid": i * 5 + j} for j, t in enumerate(texts)]
        entries.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": i,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
        if i != 11:  # one image missing from its zip
            images.append(f"zip\t{folder}.zip\t{folder}/{filename}\tjpg")
    return json.dumps({"images": entries, "dataset": "coco"})


def main() -> None:
    rng = random.Random(SEED)
    images: list[str] = []
    files = {
        "conceptual_captions/Train_GCC-training.tsv": make_cc3m(rng, images),
        "coco/dataset_coco.json": make_coco(rng, images),
    }
    files["images.tsv"] = "\n".join(images) + "\n"
    for name, text in files.items():
        (BUNDLE / name).parent.mkdir(parents=True, exist_ok=True)
        (BUNDLE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
