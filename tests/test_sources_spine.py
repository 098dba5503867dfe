"""CC3M and COCO readers on files written here in their raw formats, and on the real samples when present."""

from __future__ import annotations

import json

import pytest

from pmd_pipeline.config import SourceConfig
from pmd_pipeline.errors import PmdError
from sources import REGISTRY
from sources.base import CANDIDATE_SCHEMA, RejectLog
from tests.conftest import realdata


def read_all(name, cfg):
    rejects = RejectLog()
    import polars as pl

    frames = list(REGISTRY[name].read(cfg, rejects))
    for frame in frames:
        assert dict(frame.schema) == CANDIDATE_SCHEMA
    return (pl.concat(frames) if frames else pl.DataFrame(schema=CANDIDATE_SCHEMA)), rejects


def test_cc3m_raw_tsv_with_bad_lines(tmp_path):
    raw = (
        b" a caption with a leading space\thttps://a.example/1.jpg\n"
        b"caption \xff\xfe broken utf8\thttps://a.example/2.jpg\n"
        b"three\tcolumns\there\n"
        b"nul\x00byte\thttps://a.example/3.jpg\n"
        b"\n"
        b"no final newline\thttps://a.example/4.jpg"
    )
    (tmp_path / "cc.tsv").write_bytes(raw)
    rows, rejects = read_all(
        "conceptual_captions", SourceConfig("conceptual_captions", metadata=[str(tmp_path / "cc.tsv")])
    )
    assert rows["captions"].to_list() == [[" a caption with a leading space"], ["no final newline"]]  # unchanged
    assert [(r.line, r.reason) for r in rejects.rejects] == [
        (2, "invalid_utf8"),
        (3, "wrong_column_count"),
        (4, "nul_byte"),
    ]
    assert rows["key"].n_unique() == 2 and all("." not in k for k in rows["key"])


def test_cc3m_real_sample():
    path = realdata("cc3m", "Validation_GCC-1.1.0-Validation.subset.tsv")
    rows, rejects = read_all("conceptual_captions", SourceConfig("conceptual_captions", metadata=[str(path)]))
    assert rows.height == 2023 and len(rejects) == 0
    assert rows["image_url"].str.starts_with("http").all()


def karpathy(images):
    return {"images": images, "dataset": "coco"}


def test_coco_karpathy_keeps_train_and_restval(tmp_path):
    def image(cocoid, split, folder="train2014"):
        return {
            "filepath": folder,
            "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
            "cocoid": cocoid,
            "split": split,
            "sentences": [{"raw": f"sentence {i} of image {cocoid}"} for i in range(5)],
        }

    doc = karpathy(
        [
            image(1, "train"),
            image(2, "restval", "val2014"),
            image(3, "val", "val2014"),
            image(4, "test", "val2014"),
            {"cocoid": 5},
        ]
    )
    (tmp_path / "k.json").write_text(json.dumps(doc))
    cfg = SourceConfig(
        "coco",
        metadata=[str(tmp_path / "k.json")],
        images={"train2014": "/z/train2014.zip", "val2014": "/z/val2014.zip"},
    )
    rows, rejects = read_all("coco", cfg)
    assert rows["key"].to_list() == ["coco_1", "coco_2", "coco_3", "coco_4"]
    assert rows["drop_reason"].to_list() == [None, None, "karpathy_split_excluded", "karpathy_split_excluded"]
    assert rows["image_path"][1] == "/z/val2014.zip::val2014/COCO_val2014_000000000002.jpg"
    assert rows["captions"][0].len() == 5
    assert [(r.line, r.reason) for r in rejects.rejects] == [(5, "bad_record:KeyError")]


def test_coco_official_2014_sample_with_orphan_annotations():
    path = realdata("coco", "captions_val2014.json_samples.json")
    cfg = SourceConfig("coco", metadata=[str(path)], images={"val2014": "/z/val2014.zip"})
    rows, rejects = read_all("coco", cfg)
    # only 4 of the 100 annotations point at an image in the file, all four at image 331352
    assert rows["key"].to_list() == ["coco_331352"] and rows["captions"][0].len() == 4
    assert len(rejects) == 96 and {r.reason for r in rejects.rejects} == {"annotation_without_image"}


def test_coco_official_2017_sample():
    path = realdata("coco", "captions_val2017.json")
    cfg = SourceConfig("coco", metadata=[str(path)], images={"val2017": "/z/val2017.zip"})
    rows, rejects = read_all("coco", cfg)
    assert rows.height == 79 and rows["captions"].list.len().sum() == 395 and len(rejects) == 0
    assert rows["image_path"][0].startswith("/z/val2017.zip::val2017/")


def test_coco_unknown_layout_and_missing_archive(tmp_path):
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(PmdError, match="neither a Karpathy"):
        read_all("coco", SourceConfig("coco", metadata=[str(tmp_path / "x.json")]))
    (tmp_path / "k.json").write_text(
        json.dumps(
            karpathy(
                [
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_1.jpg",
                        "cocoid": 1,
                        "split": "train",
                        "sentences": [],
                    }
                ]
            )
        )
    )
    with pytest.raises(PmdError, match="needs the `val2014` archive"):
        read_all("coco", SourceConfig("coco", metadata=[str(tmp_path / "k.json")]))
