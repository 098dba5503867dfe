"""Bad raw input: counted and kept aside with file and line, the build goes on; an unreadable source fails alone."""

from __future__ import annotations

import json

import pytest

from pmd_pipeline.build import build
from pmd_pipeline.config import BuildConfig, SourceConfig
from sources import get_source
from sources.base import RejectLog

GOOD = b"a red bus on a street\thttp://example.com/1.jpg\n"

# name -> (raw line inserted between good lines, the reject reason it must get)
BAD_TSV_LINES = {
    "wrong_column_count": (b"only one column here\n", "wrong_column_count"),
    "too_many_columns": (b"a\tb\tc\n", "wrong_column_count"),
    "invalid_utf8": (b"caf\xe9 au lait in a cup\thttp://example.com/2.jpg\n", "invalid_utf8"),
    "nul_byte": (b"a cat\x00 on a mat\thttp://example.com/3.jpg\n", "nul_byte"),
    "very_long_line": (b"word " * 300_000 + b"\thttp://example.com/4.jpg\n", "line_too_long"),
}


def read_all(source: str, path, **options):
    rejects = RejectLog()
    cfg = SourceConfig(source, metadata=[str(path)], options=options)
    rows = [row for batch in get_source(source).read(cfg, rejects) for row in batch.iter_rows(named=True)]
    return rows, rejects


@pytest.mark.parametrize("case", sorted(BAD_TSV_LINES))
def test_a_bad_tsv_line_is_kept_aside_with_its_line_and_the_rest_is_read(tmp_path, case):
    bad, reason = BAD_TSV_LINES[case]
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_bytes(GOOD + bad + GOOD.replace(b"1.jpg", b"5.jpg"))
    rows, rejects = read_all("conceptual_captions", path)
    assert [r["image_url"] for r in rows] == ["http://example.com/1.jpg", "http://example.com/5.jpg"]
    assert [(r.file, r.line, r.reason) for r in rejects.rejects] == [(str(path), 2, reason)]


def test_a_truncated_last_line_and_an_empty_file_lose_nothing_else(tmp_path):
    truncated = tmp_path / "truncated.tsv"
    truncated.write_bytes(GOOD + b"a caption cut off before its u")
    rows, rejects = read_all("conceptual_captions", truncated)
    assert len(rows) == 1 and [(r.line, r.reason) for r in rejects.rejects] == [(2, "wrong_column_count")]
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    assert read_all("conceptual_captions", empty) == ([], RejectLog())


@pytest.mark.parametrize(
    "doc, reason",
    [
        ({"filename": 7, "cocoid": 1, "split": "train", "sentences": [{"raw": "a b c d"}]}, "bad_record:TypeError"),
        (
            {"filename": "COCO_train2014_1.jpg", "cocoid": "x", "split": "train", "sentences": []},
            "bad_record:ValueError",
        ),
        ({"filename": "COCO_train2014_1.jpg", "split": "train", "sentences": []}, "bad_record:KeyError"),
        (
            {"filename": "COCO_train2014_1.jpg", "cocoid": 1, "split": "train", "sentences": "abc"},
            "bad_record:TypeError",
        ),
    ],
)
def test_json_type_errors_in_one_record_are_kept_aside(tmp_path, doc, reason):
    good = {"filename": "COCO_train2014_2.jpg", "cocoid": 2, "split": "train", "sentences": [{"raw": "a cat on a mat"}]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [good, doc]}))
    rejects = RejectLog()
    cfg = SourceConfig("coco", metadata=[str(path)], images={"train2014": str(tmp_path / "train2014.zip")})
    rows = [r for b in get_source("coco").read(cfg, rejects) for r in b.iter_rows(named=True)]
    assert [r["key"] for r in rows] == ["coco_2"]
    assert [(r.line, r.reason) for r in rejects.rejects] == [(2, reason)]


def test_an_unreadable_source_fails_alone_with_a_clear_message(ray_session, tmp_path):
    (tmp_path / "dataset_coco.json").write_bytes(b'{"images": [1, 2')  # truncated JSON: nothing can be read
    (tmp_path / "cc.tsv").write_bytes(GOOD)
    cfg = BuildConfig(
        out=str(tmp_path / "out"),
        sources=[
            SourceConfig("coco", metadata=[str(tmp_path / "dataset_coco.json")]),
            SourceConfig("conceptual_captions", metadata=[str(tmp_path / "cc.tsv")]),
        ],
    )
    cfg.fetch.retries = 0
    result = build(cfg)
    assert list(result.sources_failed) == ["coco"]
    assert (
        result.sources_failed["coco"].startswith("source coco:")
        and "is not valid JSON" in result.sources_failed["coco"]
    )
    assert result.shards_total == 1 and result.shards_done == 1  # the other source was built
    assert result.manifest is None and not (tmp_path / "out" / "manifest.json").exists()
