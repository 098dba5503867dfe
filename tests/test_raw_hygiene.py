"""The user's raw files as editors and mirrors really write them: a UTF-8 byte-order mark, CRLF line
endings, CC3M's three-column mirror layout. And a source whose every record is malformed has failed."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from pmd_pipeline.build import build
from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.embedded import default_config
from pmd_pipeline.errors import PmdError
from pmd_pipeline.plan import PLAN_MARKER, plan_source
from shards.layout import plan_folder
from sources import get_source
from sources.base import RejectLog, require_files
from tests.conftest import realdata
from tests.test_config_validation import bundle_config

BOM = b"\xef\xbb\xbf"


def with_bom(data: bytes) -> bytes:
    return BOM + data


def with_bom_and_crlf(data: bytes) -> bytes:
    return BOM + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def rewritten(path, change, folder: Path) -> Path:
    """A copy of a raw file (or of an archive's member, as a plain file) with `change` applied to its text
    (inside the gzip for .gz files)."""
    with path.open("rb") as f:
        data = f.read()
    gzipped = data[:2] == b"\x1f\x8b"
    data = change(gzip.decompress(data) if gzipped else data)
    target = folder / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    return target


def read(source_cfg: SourceConfig) -> tuple[pl.DataFrame, list[tuple]]:
    rejects = RejectLog()
    batches = list(get_source(source_cfg.name).read(source_cfg, rejects))
    return pl.concat(batches), [(Path(r.file).name, r.line, r.reason) for r in rejects.rejects]


def strings(frame: pl.DataFrame) -> list[str]:
    """Every text a candidate carries: key, url, path, captions and each string of the raw record."""
    texts = [v for c in ("key", "image_url", "image_path") for v in frame[c] if v is not None]
    texts += [c for captions in frame["captions"] for c in captions]
    for meta in frame["meta"]:
        stack = [json.loads(meta)]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack += [*value.keys(), *value.values()]
            elif isinstance(value, list):
                stack += value
            elif isinstance(value, str):
                texts.append(value)
    return texts


@pytest.mark.parametrize("change", [with_bom, with_bom_and_crlf], ids=["bom", "bom+crlf"])
def test_every_source_reads_a_bom_and_crlf_file_exactly_as_the_plain_one(tmp_path, change):
    differ = {}
    for source_cfg in default_config(str(tmp_path)).sources:
        if not source_cfg.metadata:
            continue
        plain = bundle_config(source_cfg, tmp_path / "_embedded")
        folder = tmp_path / change.__name__ / source_cfg.name
        members = require_files(plain)  # archive::member entries (globs expanded) read as they are published
        files = [str(rewritten(p, change, folder / str(i))) for i, p in enumerate(members)]
        try:
            changed = read(dataclasses.replace(plain, metadata=files))
        except PmdError as err:
            differ[source_cfg.name] = str(err)
            continue
        expected = read(plain)
        if changed[0].to_dicts() != expected[0].to_dicts() or changed[1] != expected[1]:
            differ[source_cfg.name] = "rows or rejects differ"
        elif any("\r" in text or "\ufeff" in text for text in strings(changed[0])):
            differ[source_cfg.name] = "a \\r or a BOM is left in the rows"
    assert differ == {}


def test_a_bom_does_not_become_part_of_the_first_url_or_caption(tmp_path):
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_bytes(BOM + b"https://example.com/1.jpg\ta dog on a red sofa\r\n")
    rows, rejects = read(SourceConfig("conceptual_12m", metadata=[str(cc12m)]))
    assert rows["image_url"].to_list() == ["https://example.com/1.jpg"] and not rejects
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_bytes(BOM + b"a dog on a red sofa\thttps://example.com/1.jpg\r\n")
    rows, _ = read(SourceConfig("conceptual_captions", metadata=[str(cc3m)]))
    assert rows["captions"].to_list() == [["a dog on a red sofa"]]


def test_the_real_cc3m_sample_with_a_bom_and_crlf_endings_reads_the_same(tmp_path):
    path = realdata("cc3m", "Validation_GCC-1.1.0-Validation.subset.tsv")
    changed = rewritten(path, with_bom_and_crlf, tmp_path)
    plain, plain_rejects = read(SourceConfig("conceptual_captions", metadata=[str(path)]))
    rows, rejects = read(SourceConfig("conceptual_captions", metadata=[str(changed)]))
    assert rows.drop("meta").to_dicts() == plain.drop("meta").to_dicts() and rejects == plain_rejects
    assert not any("\r" in t or "\ufeff" in t for t in strings(rows))


def test_cc3m_with_a_mirrors_third_column_is_read_and_the_column_ignored(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    lines = [f"caption number {i} of a cat\thttp://example.com/{i}.jpg\timages/{i:09d}.jpg\n" for i in range(5)]
    lines.insert(3, "a caption without its url or path\n")
    path.write_text("".join(lines))
    rows, rejects = read(SourceConfig("conceptual_captions", metadata=[str(path)]))
    assert rows["image_url"].to_list() == [f"http://example.com/{i}.jpg" for i in range(5)]
    assert rows["captions"].to_list() == [[f"caption number {i} of a cat"] for i in range(5)]
    assert rejects == [(path.name, 4, "wrong_column_count")]  # the layout is the file's, not each line's


def test_a_stray_tab_in_a_two_column_cc3m_file_is_still_a_reject(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("a tab\there in the caption\thttp://example.com/0.jpg\n" + "a cat\thttp://example.com/1.jpg\n" * 3)
    rows, rejects = read(SourceConfig("conceptual_captions", metadata=[str(path)]))
    assert rows.height == 3 and rejects == [(path.name, 1, "wrong_column_count")]


def all_malformed(tmp_path: Path) -> Path:
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("".join(f"a\tcaption\tin\tfour columns {i}\n" for i in range(4)))
    return path


def test_a_source_whose_every_record_is_rejected_fails_naming_its_reject_file(tmp_path):
    cfg = BuildConfig(out=str(tmp_path / "out"), sources=[])
    source_cfg = SourceConfig("conceptual_captions", metadata=[str(all_malformed(tmp_path))])
    with pytest.raises(PmdError) as err:
        plan_source(cfg, source_cfg)
    rejects_file = tmp_path / "out" / "conceptual_captions" / "_rejects.jsonl"
    message = str(err.value)
    assert "\n" not in message and str(rejects_file) in message and "all 4 raw records" in message, message
    assert len(rejects_file.read_text().splitlines()) == 4
    assert not (plan_folder(Path(cfg.out), "conceptual_captions") / PLAN_MARKER).exists()  # re-planned once fixed
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")  # no records at all is not a malformed source
    assert plan_source(cfg, SourceConfig("conceptual_12m", metadata=[str(empty)]))["rows"] == 0


def test_the_build_fails_that_source_alone_with_one_line(ray_session, tmp_path):
    good = tmp_path / "cc12m.tsv"
    good.write_text("http://127.0.0.1:9/1.jpg\ta dog on a red sofa\n")
    cfg = BuildConfig(
        out=str(tmp_path / "out"),
        sources=[
            SourceConfig("conceptual_captions", metadata=[str(all_malformed(tmp_path))]),
            SourceConfig("conceptual_12m", metadata=[str(good)]),
        ],
    )
    cfg.fetch.retries = 0
    result = build(cfg)
    assert list(result.sources_failed) == ["conceptual_captions"] and result.failed
    assert result.sources_failed["conceptual_captions"].endswith("conceptual_captions/_rejects.jsonl")
    assert result.shards_total == 1 and result.shards_done == 1 and result.manifest is None
