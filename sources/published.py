"""Where each source's authors publish its files (configs/pmd.toml uses these), and the sources whose files
cannot be fetched without an agreement or a form: what to get, from where (`pmd build` says so when one is
missing, before any work)."""

from __future__ import annotations

KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
COCO_ZIPS = "http://images.cocodataset.org/zips"
LN = "https://storage.googleapis.com/localized-narratives/annotations"
WIT = "https://storage.googleapis.com/gresearch/wit/wit_v1.train.all-{:05d}-of-00010.tsv.gz"
VG_JSON = "https://visualgenome.org/static/data/dataset"
VG_IMAGES = "https://cs.stanford.edu/people/rak248/VG_100K_2"
SBU = "https://www.cs.rice.edu/~vo9/sbucaptions/sbu-captions-all.tar.gz"
ADE20K = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
CC3M = "https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv"
CC12M = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"
REDCAPS = "https://www.dropbox.com/s/cqtdpsl4hewlli1/redcaps_v1.0_annotations.zip?dl=1"

PUBLISHED: dict[str, list[str]] = {
    "coco": [KARPATHY, f"{COCO_ZIPS}/train2014.zip", f"{COCO_ZIPS}/val2014.zip"],
    "sbu_captions": [SBU],
    "localized_narratives__coco": [
        f"{LN}/coco_train_localized_narratives.jsonl",
        f"{COCO_ZIPS}/train2017.zip",
        KARPATHY,
    ],
    "localized_narratives__openimages": [
        f"{LN}/open_images_train_v6_localized_narratives-{i:05d}-of-00010.jsonl" for i in range(10)
    ],
    "localized_narratives__ade20k": [
        f"{LN}/ade20k_train_localized_narratives.jsonl",
        ADE20K,
    ],
    "localized_narratives__flickr30k": [f"{LN}/flickr30k_train_localized_narratives.jsonl"],
    "conceptual_captions": [CC3M],
    "visual_genome": [
        f"{VG_JSON}/region_descriptions.json.zip",
        f"{VG_JSON}/image_data.json.zip",
        f"{VG_IMAGES}/images.zip",
        f"{VG_IMAGES}/images2.zip",
        KARPATHY,
    ],
    "wit": [WIT.format(i) for i in range(10)],
    "conceptual_12m": [CC12M],
    "red_caps": [REDCAPS],
    "yfcc100m": [],
    "imagenet": [],
    "text_corpus": [],
}

MANUAL_STEPS: dict[str, str] = {
    "yfcc100m": (
        "YFCC100M's metadata file `yfcc100m_dataset` is given by Yahoo Webscope under its data agreement "
        "(https://webscope.sandbox.yahoo.com/catalog.php?datatype=i&did=67)"
    ),
    "localized_narratives__flickr30k": (
        "the Flickr30k images (`flickr30k-images.tar.gz`) are given only through the form at "
        "https://shannon.cs.illinois.edu/DenotationGraph/"
    ),
    "imagenet": (
        "ImageNet-1k's training images (ILSVRC2012_img_train.tar, unpacked to train/<wnid>/*.JPEG, or a tar of "
        "that folder) are given under image-net.org's terms of access (https://image-net.org/download.php)"
    ),
    "text_corpus": (
        "FLAVA's text corpora (CCNews, BookCorpus) have no single public file: use your own passages as *.txt or "
        "*.jsonl (field `text`), e.g. CC-News from Common Crawl (https://commoncrawl.org/blog/news-dataset-available)"
    ),
}


def manual_step_message(source: str, missing: str) -> str:
    """One line: what to get, from where, and where to put it."""
    return (
        f"source {source} needs a manual step: {MANUAL_STEPS[source]}. Put it at {missing} (or point "
        f"[sources.{source}] at your copy; a bucket works), or set enabled = false for this source."
    )
