"""Regenerate the embedded sample's raw metadata (committed in bundle/): `python -m pmd_pipeline.embedded.make_bundle`.

Every file is in its source's real raw format, with the awkward cases a real build meets: repeated URLs,
dead links, HTML served as an image, short captions, a malformed line, excluded Karpathy splits and a
missing archive member. images.tsv lists the images `materialize` synthesises for the local mirror and zips,
each with its look (a colour and a shape, drawn large): every caption of an image names its look, so the
embedded build has something to learn and `pmd eval` on it means something.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sources.wit import COLUMNS as WIT_COLUMNS  # the real header, not a copy

BUNDLE = Path(__file__).parent / "bundle"
SEED = 20221

# No colour among the adjectives: the colour a caption names is its image's (see LOOKS).
ADJECTIVES = ["calm", "small", "old", "bright", "wooden", "quiet", "busy", "snowy", "wide", "tall", "empty", "sunny"]
NOUNS = ["dog", "bicycle", "house", "boat", "train", "woman", "man", "child", "cat", "bus", "tree", "bridge"]
VERBS = ["standing", "waiting", "resting", "parked", "sitting", "walking", "shown", "lying"]
PLACES = ["street", "beach", "park", "kitchen", "harbour", "field", "station", "garden", "market", "river"]


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
# ImageNet's classes get looks too (the class -> look mapping is written as imagenet_classes.json)
IMAGENET_CLASSES = {"n01440764": 0, "n02102040": 7, "n03888257": 14}


def look(index: int) -> str:
    """The look of a source's index-th image: any 24 consecutive images differ (6 colours x 4 shapes)."""
    return f"{COLOURS[index % len(COLOURS)]} {SHAPES[index // len(COLOURS) % len(SHAPES)]}"


def caption(rng: random.Random, seen: str) -> str:
    """The template's eight words, its subject the image's look: "a red circle resting near the quiet street"."""
    _draw_old_subject(rng)
    return f"a {seen} {rng.choice(VERBS)} near the {rng.choice(ADJECTIVES)} {rng.choice(PLACES)}"


def _draw_old_subject(rng: random.Random) -> None:
    """The random subject the captions had before looks, drawn and unused: every later draw of the bundle
    (how many sentences a passage has, which records are short) stays as it was, so every count does."""
    rng.choice(ADJECTIVES), rng.choice(NOUNS)


def make_cc3m(rng: random.Random, images: list[str]) -> str:
    """200 rows of `caption<TAB>url`, plus duplicates, dead links, HTML bodies, short captions, bad lines."""
    lines = []
    for i in range(200):
        url = f"https://img{i % 3}.cc3m-sample.invalid/photos/{i:04d}.jpg"
        text = caption(rng, look(i)) if i % 25 else rng.choice(["sunset", "my dog"])  # 8 short: kept (only YFCC)
        lines.append(f"{text}\t{url}")
        kind = "missing" if i % 33 == 7 else "html" if i % 97 == 5 else "jpg"
        if kind != "missing":
            images.append(f"mirror\timg{i % 3}.cc3m-sample.invalid/photos/{i:04d}.jpg\t{kind}\t{look(i)}")
    lines.insert(40, f"{caption(rng, look(10))}\thttps://img1.cc3m-sample.invalid/photos/0010.jpg")  # same image twice
    lines.insert(90, "a caption without its url column")  # malformed: one column
    lines.insert(120, f"{caption(rng, look(0))}\tftp://files.cc3m-sample.invalid/photo.jpg")  # not http(s)
    return "\n".join(lines) + "\n"


def make_coco(rng: random.Random, images: list[str]) -> str:
    """A Karpathy dataset_coco.json: 70 images, splits train/restval (kept) and val/test (excluded)."""
    entries = []
    for i in range(70):
        cocoid = 100_000 + i * 37
        folder = "train2014" if i % 2 else "val2014"
        split = "test" if i % 10 == 3 else "val" if i % 10 == 6 else "restval" if folder == "val2014" else "train"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        texts = [caption(rng, look(i)) for _ in range(5)]
        if i % 7 == 0:
            texts[4] = "two words"  # kept: PMD text-filters only YFCC
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
            images.append(f"zip\t{folder}.zip\t{folder}/{filename}\tjpg\t{look(i)}")
    return json.dumps({"images": entries, "dataset": "coco"})


def sentence(rng: random.Random, words: int, seen: str) -> str:
    text = caption(rng, seen)
    while len(text.split()) < words:
        text += f" and a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return text


def mirror(images: list[str], url: str, seen: str, kind: str = "jpg") -> None:
    images.append(f"mirror\t{url.split('://', 1)[1]}\t{kind}\t{seen}")


def make_sbu(rng: random.Random, images: list[str]) -> str:
    urls = [f"http://static.flickr.com/{1000 + i}/{4000000 + i * 7}_a1b2c3.jpg" for i in range(30)]
    for i, url in enumerate(urls):
        if i % 11 != 4:  # a few dead links
            mirror(images, url, look(i))
    captions = [caption(rng, look(i)) if i % 9 else "me" for i in range(30)]  # "me": one word, kept
    return json.dumps({"image_urls": urls, "user_ids": [f"{i}@N0{i % 9}" for i in range(30)], "captions": captions})


def make_cc12m(rng: random.Random, images: list[str]) -> str:
    lines = []
    for i in range(30):
        url = f"https://cdn.cc12m-sample.invalid/img/{i:03d}.jpg?w=640&fit=crop"
        text = sentence(rng, 14, look(i))
        if i % 3 == 0:  # the real file's placeholder for a person's name
            text = text.replace(" near the ", " near <PERSON> and the ", 1)
        lines.append(f"{url}\t{text}")
        if i != 17:
            mirror(images, url, look(i))
    return "\n".join(lines)  # the real file's last line has no newline either


def make_red_caps(rng: random.Random, images: list[str]) -> dict[str, str]:
    files = {}
    for name, with_info in (("abandoned_2017", True), ("itookapicture_2019", False)):
        annotations = []
        for i in range(15):
            image_id = f"{name[:3]}{i:03d}x"
            url = f"https://i.redd.it/{image_id}.jpg"
            raw = caption(rng, look(i)) + (" [OC] [4032x3024]" if i % 4 == 0 else "")
            annotations.append(
                {
                    "image_id": image_id,
                    "author": f"user{i}",
                    "url": url,
                    "raw_caption": raw,
                    "caption": raw.lower().replace(" [oc] [4032x3024]", ""),
                    "subreddit": name.split("_")[0],
                    "score": 10 + i,
                    "created_utc": 1500000000 + i * 3600,
                    "permalink": f"/r/{name.split('_')[0]}/comments/{image_id}/",
                }
            )
            mirror(images, url, look(i))
        annotations.append({"image_id": "broken", "url": 5})  # a record without its caption
        doc = {"annotations": annotations}
        if with_info:
            doc = {"info": {"start_date": "2017-01-01", "end_date": "2017-12-31", "url": "", "version": "1.0"}, **doc}
        files[f"red_caps/annotations/{name}.json"] = json.dumps(doc)
    return files


FRENCH = "une belle journée au bord de la mer avec des amis et la famille pendant les vacances"
GERMAN = "ein schöner Tag am Strand mit Freunden und der ganzen Familie im Sommerurlaub"
ENGLISH_DESCRIPTIONS = [
    "We spent the afternoon walking along the old harbour and watching the boats come in",
    "The view from the top of the hill was worth the long climb in the morning heat",
    "My grandmother's garden in full bloom after a week of spring rain",
]


def yfcc_row(i: int, title: str, description: str, marker: int = 0) -> str:
    from urllib.parse import quote_plus

    photo_id = 5000000000 + i * 13
    fields = [
        str(i), str(photo_id), f"{i:032x}", f"{i}@N00", f"user{i}", "2012-02-16 09:56:37.0", str(1331840483 + i),
        "Canon+PowerShot", quote_plus(title), quote_plus(description), "tag1,tag2", "", "", "", "",
        f"http://www.flickr.com/photos/{i}@N00/{photo_id}/",
        f"http://farm{i % 9}.staticflickr.com/{i}/{photo_id}_ab.jpg",
        "Attribution+License", "http://creativecommons.org/licenses/by/2.0/", str(i), str(i % 9), "ab", "cd", "jpg",
        str(marker),
    ]  # fmt: skip
    return "\t".join(fields)


def make_yfcc(rng: random.Random, images: list[str]) -> str:
    rows = []
    for i in range(40):
        kind = i % 8
        if kind == 0:
            title, description = "IMG_0520", ""  # camera default title, no description: dropped
        elif kind == 1:
            title, description = (
                sentence(rng, 6, look(i)),
                '<a href="http://x.example/">my blog</a> ' + rng.choice(ENGLISH_DESCRIPTIONS),
            )
        elif kind == 2:
            title, description = "2013 10 09", "2013 10 09 12:30"  # date-only both: dropped
        elif kind == 3:
            title, description = sentence(rng, 6, look(i)), FRENCH  # French description: the English title is used
        elif kind == 4:
            title, description = "Strand", GERMAN  # neither passes
        else:
            title, description = sentence(rng, 5, look(i)), rng.choice(ENGLISH_DESCRIPTIONS) + "\n\n  with friends"
        rows.append(yfcc_row(i, title, description, marker=1 if i == 13 else 0))
        url = f"http://farm{i % 9}.staticflickr.com/{i}/{5000000000 + i * 13}_ab.jpg"
        mirror(images, url, look(i))
    rows.insert(20, "\t".join(["broken"] * 12))  # wrong column count
    return "\n".join(rows) + "\n"


def make_wit(rng: random.Random, images: list[str]) -> bytes:
    import csv
    import gzip
    import io

    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quotechar='"', lineterminator="\n")
    writer.writerow(WIT_COLUMNS)
    for i in range(24):
        url = f"https://upload.wikimedia.org/wikipedia/commons/{i % 10}/{i:02d}/Picture_{i}.jpg"
        language = "fr" if i % 6 == 5 else "en"
        reference = caption(rng, look(i)) if i % 3 == 0 else ("Eiffel Tower" if i % 3 == 1 else "")
        english = f"English: {sentence(rng, 6, look(i))} Français : une photo" if i % 4 == 2 else ""
        attribution = english or "Deutsch: Ein Bild"
        alt = f"{caption(rng, look(i))} café" if i % 2 else ""
        context = f"A page about picture {i}.\nIt has two lines." if i % 5 == 0 else f"Page {i}"
        writer.writerow(
            [language, f"https://{language}.wikipedia.org/wiki/P{i}", url, f"P{i}", "", f"P{i}", reference,
             attribution, alt, "image/jpeg", "600", "800", "true", "true", "false", context, ""]
        )  # fmt: skip
        mirror(images, url, look(i))
    return gzip.compress(out.getvalue().encode("utf-8"), mtime=0)


def make_visual_genome(rng: random.Random, images: list[str], karpathy_eval: list[int]) -> dict[str, str]:
    image_data, regions = [], []
    for i in range(8):
        image_id = 10 + i
        folder = "VG_100K" if i % 2 else "VG_100K_2"
        coco_id = karpathy_eval[i] if i in (2, 5) else (None if i % 3 else 900_000 + i)  # 2 contaminated
        image_data.append(
            {"width": 800, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg", "height": 600,
             "image_id": image_id, "coco_id": coco_id, "flickr_id": None}
        )  # fmt: skip
        zip_name = "images.zip" if folder == "VG_100K" else "images2.zip"
        images.append(f"zip\t{zip_name}\t{folder}/{image_id}.jpg\tjpg\t{look(i)}")
        boxes = [(10 + 20 * j, 15 + 10 * j, 60 + 10 * j, 40 + 5 * j) for j in range(4)]
        image_regions = []
        for j, (x, y, w, h) in enumerate(boxes):
            _draw_old_subject(rng)  # each region's phrase names its image's look
            image_regions.append({"region_id": image_id * 100 + j, "width": w, "height": h, "image_id": image_id,
                                  "phrase": f" {look(i)}\n", "y": y, "x": x})  # fmt: skip
        image_regions.append({**image_regions[0], "region_id": image_id * 100 + 9, "phrase": "the same box again"})
        regions.append({"regions": image_regions, "id": image_id})
    return {
        "visual_genome/image_data.json": json.dumps(image_data),
        "visual_genome/region_descriptions.json": json.dumps(regions),
    }


def narrative(rng: random.Random, seen: str) -> str:
    parts = (f"In this image I can see {caption(rng, seen)}", f"On the left there is {caption(rng, seen)}", " ")
    return ". ".join((*parts, "In the back")) + f" {caption(rng, seen)}."


def make_localized_narratives(rng: random.Random, images: list[str], karpathy_ids: list[int]) -> dict[str, str]:
    files = {}
    openimages = []
    for i in range(10):
        image_id = f"{0xA000 + i * 97:016x}"
        openimages.append({"dataset_id": "open_images", "image_id": image_id, "annotator_id": i % 3,
                           "caption": narrative(rng, look(i)), "timed_caption": [], "traces": []})  # fmt: skip
        mirror(images, f"https://s3.amazonaws.com/open-images-dataset/train/{image_id}.jpg", look(i))
    openimages.append({**openimages[0], "annotator_id": 7, "caption": narrative(rng, look(0))})  # a second narrative
    files["localized_narratives/open_images_train_v6_localized_narratives-00000-of-00010.jsonl"] = openimages
    coco = []
    for i, cocoid in enumerate(karpathy_ids[:12]):
        record = {
            "dataset_id": "mscoco_train2017",
            "image_id": str(cocoid),
            "annotator_id": i,
            "caption": narrative(rng, look(i)),
        }
        if i % 4 != 1:
            record["traces"] = []  # some real rows lack traces
        coco.append(record)
        images.append(f"zip\ttrain2017.zip\ttrain2017/{cocoid:012d}.jpg\tjpg\t{look(i)}")
    files["localized_narratives/coco_train_localized_narratives.jsonl"] = coco
    ade = []
    for i in range(6):
        image_id = f"ADE_train_{i + 1:08d}"
        text = narrative(rng, look(i))
        ade.append({"dataset_id": "ADE20k", "image_id": image_id, "annotator_id": 1, "caption": text})
        member = f"ADEChallengeData2016/images/training/{image_id}.jpg"
        images.append(f"zip\tADEChallengeData2016.zip\t{member}\tjpg\t{look(i)}")
    files["localized_narratives/ade20k_train_localized_narratives.jsonl"] = ade
    out = {name: "\n".join(json.dumps(r) for r in rows) + "\n" for name, rows in files.items()}
    out["localized_narratives/ade20k_train_localized_narratives.jsonl"] += '{"dataset_id": "ADE20k", "image_id"\n'
    return out


def make_imagenet(images: list[str]) -> str:
    """Each class's images share its look; returns the class -> name mapping (the look) for `pmd eval`."""
    for wnid, index in IMAGENET_CLASSES.items():
        for i in range(6):
            images.append(f"tar\timagenet_train.tar\ttrain/{wnid}/{wnid}_{1000 + i}.JPEG\tjpg\t{look(index)}")
    return json.dumps({wnid: look(index) for wnid, index in IMAGENET_CLASSES.items()}, indent=1) + "\n"


def make_text_corpus(rng: random.Random) -> dict[str, str]:
    paragraphs = [" ".join(sentence(rng, 12, look(j)) + "." for j in range(rng.randint(3, 30))) for _ in range(12)]
    docs = [" ".join(sentence(rng, 10, look(j)) + "." for j in range(8)) for _ in range(6)]
    docs = [json.dumps({"text": text, "id": i}) for i, text in enumerate(docs)]
    docs.insert(3, '{"title": "a document without text"}')
    return {
        "text_corpus/books.txt": "\n\n".join(paragraphs) + "\n",
        "text_corpus/news.jsonl": "\n".join(docs) + "\n",
    }


def main() -> None:
    rng = random.Random(SEED)
    images: list[str] = []
    cc3m_tsv = make_cc3m(rng, images)  # first: the older sources keep their bytes when new ones are added
    coco_json = make_coco(rng, images)
    coco_doc = json.loads(coco_json)
    karpathy_eval = [img["cocoid"] for img in coco_doc["images"] if img["split"] in ("val", "test")]
    karpathy_ids = [img["cocoid"] for img in coco_doc["images"]]
    files: dict[str, str | bytes] = {
        "conceptual_captions/Train_GCC-training.tsv": cc3m_tsv,
        "coco/dataset_coco.json": coco_json,
        "sbu_captions/sbu-captions-all.json": make_sbu(rng, images),
        "conceptual_12m/cc12m.tsv": make_cc12m(rng, images),
        **make_red_caps(rng, images),
        "yfcc100m/yfcc100m_dataset": make_yfcc(rng, images),
        "wit/wit_v1.train.all-00000-of-00010.tsv.gz": make_wit(rng, images),
        **make_visual_genome(rng, images, karpathy_eval),
        **make_localized_narratives(rng, images, karpathy_ids),
        **make_text_corpus(rng),
    }
    files["imagenet_classes.json"] = make_imagenet(images)
    files["images.tsv"] = "\n".join(images) + "\n"
    for name, content in files.items():
        (BUNDLE / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (BUNDLE / name).write_bytes(content)
        else:
            (BUNDLE / name).write_text(content, encoding="utf-8")


if __name__ == "__main__":
    main()
