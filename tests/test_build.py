"""The embedded build end to end: shards readable by webdataset, captions match the bundle, nothing unaccounted."""

from __future__ import annotations

import csv
import json

import polars as pl
import webdataset as wds

from pmd_pipeline.embedded import BUNDLE
from sources.conceptual_captions import url_key
from tests.helpers import all_samples, build_embedded, jpeg_size, sample_captions

# The two sources of the spine's original bundle; their bytes never change when sources are added.
SPINE_SOURCES = ("conceptual_captions", "coco")


def spine_files(out, pattern: str) -> list[str]:
    return [str(p) for source in SPINE_SOURCES for p in sorted((out / source).glob(pattern))]


def bundled_cc3m_captions() -> dict[str, list[str]]:
    """Captions per sample key straight from the bundled raw TSV, merged per URL like the pipeline must; every
    non-empty caption stays ("my dog" too: PMD text-filters only YFCC)."""
    expected: dict[str, list[str]] = {}
    with open(BUNDLE / "conceptual_captions/Train_GCC-training.tsv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) == 2 and row[0].split():
                expected.setdefault(url_key("cc3m", row[1]), []).append(row[0])
    return expected


def bundled_coco_captions() -> dict[str, list[str]]:
    doc = json.loads((BUNDLE / "coco/dataset_coco.json").read_text())
    return {
        f"coco_{img['cocoid']}": [s["raw"] for s in img["sentences"] if s["raw"].split()]  # "two words" too
        for img in doc["images"]
        if img["split"] in ("train", "restval")
    }


def test_webdataset_reads_back_the_bundled_captions(embedded_build):
    out, result = embedded_build
    assert not result.failed and result.shards_total == 17
    expected = {**bundled_cc3m_captions(), **bundled_coco_captions()}
    dataset = wds.WebDataset(spine_files(out, "0*.tar"), shardshuffle=False)
    seen = {}
    for sample in dataset:
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["captions"][0]
        assert jpeg_size(sample["jpg"]) == (224, 224)
        seen[sample["__key__"]] = meta["captions"]
    assert len(seen) == 246  # 238 before the two-word captions were kept (8 CC3M rows)
    for key, captions in seen.items():
        assert captions == expected[key], key
    # every expected image is written unless its row failed with a recorded reason
    failed = pl.read_parquet(spine_files(out, "0*.parquet")).filter(pl.col("status") == "failed")
    assert set(expected) - set(seen) == set(failed["key"])


def test_repeated_url_is_one_sample_with_both_captions(embedded_build):
    out, _ = embedded_build
    captions = sample_captions(out)[url_key("cc3m", "https://img1.cc3m-sample.invalid/photos/0010.jpg")]
    assert len(captions) == 2


def test_every_row_is_accounted_for_with_a_reason(embedded_build):
    out, _ = embedded_build
    table = pl.read_parquet(spine_files(out, "0*.parquet"))
    assert table.height == 271  # 201 unique CC3M images (1 malformed line aside) + 70 COCO images
    assert table.filter(pl.col("status") != "written")["reason"].null_count() == 0
    reasons = dict(table.filter(pl.col("status") != "written")["reason"].value_counts().iter_rows())
    assert reasons == {
        "http_404": 6,  # URLs the mirror does not have
        "decode_error": 3,  # HTML served instead of an image
        "url_scheme_not_allowed": 1,  # ftp://
        "karpathy_split_excluded": 14,  # COCO val + test
        "image_missing": 1,  # a Karpathy image absent from its zip
    }
    for stats_file in out.glob("*/*_stats.json"):
        s = json.loads(stats_file.read_text())
        assert s["rows_in"] == s["samples_written"] + sum(s["rows_dropped"].values()) + sum(s["rows_failed"].values())


def test_malformed_raw_line_is_kept_aside_with_its_line_number(embedded_build):
    out, _ = embedded_build
    rejects = [json.loads(line) for line in (out / "conceptual_captions/_rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(91, "wrong_column_count")]
    assert rejects[0]["raw"].startswith("a caption without its url column")


def test_manifest_lists_every_shard_with_its_sha256(embedded_build):
    import hashlib

    out, _ = embedded_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["sources"]["conceptual_captions"]["samples_written"] + manifest["sources"]["coco"]["samples_written"]
        == 246
    )
    assert manifest["totals"]["samples_written"] == sum(s["samples_written"] for s in manifest["sources"].values())
    assert manifest["versions"]["img2dataset"] == "1.47.0"
    for source in manifest["sources"].values():
        for shard in source["shard_files"]:
            assert hashlib.sha256((out / shard["tar"]).read_bytes()).hexdigest() == shard["sha256"]


def test_rerun_skips_finished_shards_and_changes_nothing(embedded_build):
    out, _ = embedded_build
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/0*")}
    result = build_embedded(out)
    assert result.shards_skipped == 17 and result.shards_done == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/0*")}


def test_same_config_twice_gives_identical_shards(embedded_build, tmp_path):
    out, _ = embedded_build
    other = tmp_path / "again"
    build_embedded(other)
    assert all_samples(other) == all_samples(out)


def test_every_bundled_source_is_built(embedded_build):
    from sources import REGISTRY

    out, result = embedded_build
    built = {name for name, s in result.manifest["sources"].items() if s["samples_written"] > 0}
    assert built == set(REGISTRY) - {"localized_narratives__flickr30k"}  # Flickr30k needs a manual download


def test_unimodal_and_cropped_samples_have_their_own_formats(embedded_build):
    out, _ = embedded_build
    text = [s for s in wds.WebDataset(spine_like(out, "text_corpus"), shardshuffle=False)]
    assert text and all(set(s) >= {"txt", "json"} and "jpg" not in s for s in text)
    assert all(len(s["txt"].decode().split()) <= 120 for s in text)
    images = [s for s in wds.WebDataset(spine_like(out, "imagenet"), shardshuffle=False)]
    assert len(images) == 18 and all("txt" not in s and jpeg_size(s["jpg"]) == (224, 224) for s in images)
    labels = {(json.loads(s["json"])["label"], int(s["cls"])) for s in images}  # the class also as KEY.cls
    assert labels == {("n01440764", 0), ("n02102040", 1), ("n03888257", 2)}
    regions = [json.loads(s["json"]) for s in wds.WebDataset(spine_like(out, "visual_genome"), shardshuffle=False)]
    assert regions and all(
        r["crop_box"] and r["original_width"] == r["crop_box"][2] - r["crop_box"][0] for r in regions
    )


def test_contamination_rule_drops_karpathy_eval_images_in_vg_and_ln_coco(embedded_build):
    out, _ = embedded_build
    for source in ("visual_genome", "localized_narratives__coco"):
        table = pl.read_parquet(out / source / "*.parquet")
        assert table.filter(pl.col("reason") == "karpathy_contamination").height > 0, source


def spine_like(out, source: str) -> list[str]:
    return [str(p) for p in sorted((out / source).glob("0*.tar"))]


def test_a_materialized_copy_from_another_bundle_or_code_is_redone_not_reused(tmp_path):
    """A bucket build's scratch copy of the embedded sample outlives the run: a copy an older bundle or older
    code made (here: an image changed and the marker of another version) is made again, whole."""
    from pmd_pipeline.embedded import MATERIALIZED_MARKER, materialize, materialized_fingerprint

    root = materialize(str(tmp_path / "out"))
    image = next(p for p in sorted((root / "mirror").rglob("*.jpg")))
    fresh = image.read_bytes()
    assert (root / MATERIALIZED_MARKER).read_text() == materialized_fingerprint()

    image.write_bytes(b"an image of an older bundle")
    assert materialize(str(tmp_path / "out")) == root and image.read_bytes() != fresh  # current: reused as is
    (root / MATERIALIZED_MARKER).write_text("2: published packaging in mirror/\n")  # the layout marker of before
    materialize(str(tmp_path / "out"))
    assert image.read_bytes() == fresh and (root / MATERIALIZED_MARKER).read_text() == materialized_fingerprint()
