"""`pmd verify`: a clean tokenized build passes and gets its indexes; each kind of damage is caught and exits 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.inspection.verify import verify_build
from tests.inspect_helpers import copy_build, npy_bytes, read_members, tar_samples, tokenize_build, write_tar

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenized(embedded_build, tmp_path_factory):
    return tokenize_build(copy_build(embedded_build[0], tmp_path_factory.mktemp("verify") / "clean"))


@pytest.fixture
def damaged(tokenized, tmp_path):
    return copy_build(tokenized, tmp_path / "out")


def problems(out) -> list[str]:
    return [f"{c.tar}: {p}" for cs in verify_build(out).values() for c in cs for p in c.problems]


def replace_member(tar, suffix: str, data: bytes) -> None:
    """Swap the first member ending in `suffix` (keeps every other byte the writer made)."""
    members = read_members(tar)
    index = next(i for i, (name, _) in enumerate(members) if name.endswith(suffix))
    members[index] = (members[index][0], data)
    write_tar(tar, members)


def test_clean_build_passes_and_gets_sizes_and_wids_index(tokenized):
    result = runner.invoke(app, ["verify", str(tokenized)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tokenized / "manifest.json").read_text())
    for source, entry in manifest["sources"].items():
        expected = {s["tar"].split("/")[1]: s["samples"] for s in entry["shard_files"]}
        assert json.loads((tokenized / source / "sizes.json").read_text()) == expected
        index = json.loads((tokenized / source / "shardindex.json").read_text())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert {s["url"]: s["nsamples"] for s in index["shardlist"]} == {k: v for k, v in expected.items() if v}


def test_untokenized_build_passes(embedded_build, tmp_path):
    assert problems(copy_build(embedded_build[0], tmp_path / "out")) == []


def test_broken_jpeg_is_caught(damaged):
    tar = damaged / "coco/00000.tar"
    jpg = next(data for name, data in read_members(tar) if name.endswith(".jpg"))
    replace_member(tar, ".jpg", jpg[: len(jpg) // 3])
    found = problems(damaged)
    assert any("coco/00000.tar" in p and ".jpg: does not decode" in p for p in found), found
    assert any("sha256" in p and "differs from manifest" in p for p in found), found
    result = runner.invoke(app, ["verify", str(damaged)])
    assert result.exit_code == 1 and "does not decode" in result.output


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.full((14, 14), 8192, dtype=np.uint16), "outside the codebook"),
        (np.zeros((14, 14), dtype=np.int32), "dtype int32"),
        (np.zeros((7, 7), dtype=np.uint16), "shape (7, 7)"),
    ],
)
def test_bad_tokens_are_caught(damaged, tokens, message):
    replace_member(damaged / "conceptual_captions/00001.tar", ".dvae.npy", npy_bytes(tokens))
    assert any(".dvae.npy" in p and message in p for p in problems(damaged))


def test_bad_json_and_missing_caption_are_caught(damaged):
    tar = damaged / "coco/00001.tar"
    members = read_members(tar)
    first_key = members[0][0].partition(".")[0]
    members = [(n, b"{not json" if n.endswith(".json") else d) for n, d in members if n != f"{first_key}.txt"]
    write_tar(tar, members)
    found = problems(damaged)
    assert any(f"{first_key}: missing .txt" in p for p in found)
    assert any(".json: does not parse" in p for p in found)


def test_caption_that_differs_from_its_json_is_caught(damaged):
    replace_member(damaged / "coco/00000.tar", ".txt", b"some other caption")
    assert any(".txt is not the first caption of .json" in p for p in problems(damaged))


def test_counts_and_files_are_checked_against_the_manifest(damaged):
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["sources"]["coco"]["shard_files"][0]["samples"] += 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    (damaged / "conceptual_captions/00002.tar").unlink()
    (damaged / "coco/00009.tar").write_bytes((damaged / "coco/00001.tar").read_bytes())
    found = problems(damaged)
    assert any(p.startswith("coco/00000.tar") and "manifest.json says" in p for p in found)
    assert any(p.startswith("conceptual_captions/00002.tar") and "missing on disk" in p for p in found)
    assert any(p.startswith("coco/00009.tar") and "not listed in manifest.json" in p for p in found)


def test_stale_token_sidecar_is_caught(damaged):
    sidecar = damaged / "coco/00000_dvae.json"
    doc = json.loads(sidecar.read_text())
    doc["tar_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(doc))
    assert any("_dvae.json describes another tar" in p for p in problems(damaged))


def test_tokens_without_a_sidecar_are_caught(damaged):
    (damaged / "coco/00000_dvae.json").unlink()
    assert any("carry tokens but there is no _dvae.json" in p for p in problems(damaged))


def test_unimodal_sources_need_their_own_members(embedded_build):
    from pmd_pipeline.inspection.verify import check_sample

    sample = next(iter(tar_samples(embedded_build[0], "coco").values()))
    image_only = {"jpg": sample["jpg"], "json": sample["json"]}
    assert check_sample("imagenet", image_only) == []
    assert check_sample("coco", image_only) == ["missing .txt"]
    assert check_sample("text_corpus", {"txt": b"a passage of text"}) == []
    passage = next(iter(tar_samples(embedded_build[0], "text_corpus").values()))
    assert check_sample("text_corpus", {"json": passage["json"]}) == ["missing .txt"]
    assert check_sample("text_corpus", {"txt": b"  "}) == [".txt: empty caption"]


def test_json_off_the_schema_and_a_wrong_class_are_caught(embedded_build):
    from pmd_pipeline.inspection.verify import check_sample

    image = next(iter(tar_samples(embedded_build[0], "imagenet").values()))
    assert check_sample("imagenet", image) == []
    doc = json.loads(image["json"])
    off_schema = {**image, "json": json.dumps({**doc, "url": None, "meta": {"label": "x"}}).encode()}
    assert check_sample("imagenet", off_schema) == [
        ".json: breaks the sample schema: url = None is not string; meta = {'label': 'x'} is not string"
    ]
    assert check_sample("imagenet", {**image, "cls": b"7"}) == [f".cls is 7, .json says cls {doc['cls']}"]
    assert check_sample("imagenet", {**image, "cls": b"n01440764"})[0].startswith(".cls: b'n01440764' is not")
    without = {k: v for k, v in image.items() if k != "cls"}
    assert check_sample("imagenet", without) == [f".cls is missing, .json says cls {doc['cls']}"]


def test_source_option_narrows_the_check(damaged):
    (damaged / "conceptual_captions/00002.tar").unlink()
    assert runner.invoke(app, ["verify", str(damaged), "--source", "coco"]).exit_code == 0
    assert runner.invoke(app, ["verify", str(damaged), "--source", "conceptual_captions"]).exit_code == 1


def test_build_without_manifest_is_an_error(damaged):
    (damaged / "manifest.json").unlink()
    result = runner.invoke(app, ["verify", str(damaged)])
    assert result.exit_code == 2 and "no manifest.json" in " ".join(result.output.split())
