"""The whole build opens as one dataset in every reader: README's "Reading the shards" snippets are run as written
against the embedded build (webdataset, wids, Ray Data, HF datasets, and open_clip's list and size lookup), and
the build-wide indexes are checked against the tars themselves."""

from __future__ import annotations

import ast
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
import yaml

from pmd_pipeline.card import write_card
from pmd_pipeline.indexes import write_build_indexes
from pmd_pipeline.storage import as_path
from shards.schema import JSON_SCHEMA, SAMPLE_SCHEMA, hf_features, json_problems
from sources import get_source
from tests.inspect_helpers import copy_build, tar_samples, tokenize_build
from tests.s3_server import s3_server

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"<!-- run-by tests/test_readers.py: (\w+) -->\n```python\n(.*?)```", re.S)


def snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(README.read_text()))


@pytest.fixture(scope="module")
def out(embedded_build) -> Path:
    out = embedded_build[0]
    assert out.name == "pmd_out"  # the snippets name the folder as README's readers would
    return out


@pytest.fixture
def run_snippet(out, monkeypatch):
    """Run one README snippet from the folder holding pmd_out; return what it defined."""
    monkeypatch.chdir(out.parent)

    def run(name: str) -> dict:
        namespace: dict = {}
        exec(compile(snippets()[name], f"README.md:{name}", "exec"), namespace)  # noqa: S102 (our own README)
        return namespace

    return run


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def listed(out: Path, name: str) -> list[str]:
    return (out / name).read_text().splitlines()


def test_every_reader_has_a_snippet_in_the_readme():
    assert set(snippets()) == {"webdataset", "wids", "ray_data", "hf_datasets", "open_clip"}


def test_every_sample_json_follows_the_one_schema(out):
    docs = [json.loads(s["json"]) for s in tar_samples(out).values()]
    assert {d["source"] for d in docs} == set(manifest(out)["sources"])
    assert [p for d in docs for p in json_problems(d)] == []
    table = pa.Table.from_pylist(docs)  # inferred across every source at once: one type per column
    assert table.schema.equals(pa.schema(list(JSON_SCHEMA)))


def test_imagenet_samples_carry_their_class_as_cls(out):
    images = tar_samples(out, "imagenet")
    docs = {k: json.loads(s["json"]) for k, s in images.items()}
    assert {int(s["cls"]) for s in images.values()} == {d["cls"] for d in docs.values()} == {0, 1, 2}
    assert all(int(images[k]["cls"]) == d["cls"] for k, d in docs.items())
    wnids = sorted({d["label"] for d in docs.values()})
    assert all(wnids.index(d["label"]) == d["cls"] for d in docs.values())  # sorted class folders, as ImageFolder
    others = [s for k, s in tar_samples(out).items() if not k.startswith("imagenet_")]
    assert not any("cls" in s for s in others)


def test_build_wide_indexes_name_every_tar_once(out):
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.glob("*/[0-9]*.tar"))
    everything = listed(out, "shards.txt")
    assert sorted(everything) == on_disk and len(set(everything)) == len(everything)
    tasks = {task: listed(out, f"shards_{task}.txt") for task in ("pairs", "image", "text")}
    assert tasks["pairs"] + tasks["image"] + tasks["text"] == everything  # pairs first, then image, then text
    assert {p.split("/")[0] for p in tasks["image"]} == {"imagenet"}
    assert {p.split("/")[0] for p in tasks["text"]} == {"text_corpus"}
    sizes = json.loads((out / "sizes.json").read_text())
    counts = Counter(f"{s['__url__']}" for s in _webdataset([str(out / p) for p in everything]))
    assert sizes == {p: counts.get(str(out / p), 0) for p in everything}
    index = json.loads((out / "shardindex.json").read_text())
    assert [s["url"] for s in index["shardlist"]] == [p for p in everything if sizes[p]]
    assert all(s["filesize"] == (out / s["url"]).stat().st_size for s in index["shardlist"])


def _webdataset(urls: list[str]):
    return wds.WebDataset(urls, shardshuffle=False)


def test_webdataset_reads_every_pair_once(run_snippet, out):
    pairs = list(run_snippet("webdataset")["pairs"])
    keys = [key for _, _, _, key in pairs]
    expected = {k for path in listed(out, "shards_pairs.txt") for k in tar_samples(out, path.split("/")[0])}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    for image, caption, meta, _ in pairs:
        assert image.size == (224, 224) and caption == meta["captions"][0]
    everything = list(_webdataset([str(out / p) for p in listed(out, "shards.txt")]))
    assert len({s["__key__"] for s in everything}) == len(everything) == manifest(out)["totals"]["samples_written"]


def test_wids_opens_the_whole_build_through_one_index(run_snippet, out, tmp_path, monkeypatch):
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids_cache"))
    namespace = run_snippet("wids")
    dataset, sample = namespace["dataset"], namespace["sample"]
    assert len(dataset) == manifest(out)["totals"]["samples_written"]
    assert sample["__key__"] in tar_samples(out, "text_corpus")  # the last tar listed is the text corpus's
    keys = [dataset[i]["__key__"] for i in range(len(dataset))]
    assert len(set(keys)) == len(keys) and set(keys) == set(tar_samples(out))


def test_ray_data_reads_the_shard_list_each_sample_once(run_snippet, out, ray_session):
    namespace = run_snippet("ray_data")
    keys = [row["__key__"] for row in namespace["rows"].select_columns(["__key__"]).take_all()]
    assert len(keys) == len(set(keys)) == manifest(out)["totals"]["samples_written"]
    assert set(keys) == set(tar_samples(out))
    sizes = json.loads((out / "sizes.json").read_text())
    pair = namespace["pairs"].take(1)[0]
    assert namespace["pairs"].count() == sum(sizes[p] for p in listed(out, "shards_pairs.txt"))
    assert pair["jpg"].shape == (224, 224, 3) and pair["txt"] == pair["json"]["captions"][0]


def test_hf_datasets_loads_the_build_by_its_card(run_snippet, out, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    namespace = run_snippet("hf_datasets")
    everything, coco, two_sources = namespace["everything"], namespace["coco"], namespace["two_sources"]
    entries = manifest(out)["sources"]
    assert len(everything) == manifest(out)["totals"]["samples_written"]
    assert Counter(j["source"] for j in everything["json"]) == {n: e["samples_written"] for n, e in entries.items()}
    assert everything.features.arrow_schema.equals(SAMPLE_SCHEMA.remove_metadata().set(0, pa.field("jpg", _IMAGE)))
    assert len(coco) == entries["coco"]["samples_written"] and set(coco["__key__"]) == set(tar_samples(out, "coco"))
    counts = Counter(j["source"] for j in two_sources["json"])
    sizes = json.loads((out / "sizes.json").read_text())
    assert counts == {"coco": sizes["coco/00000.tar"], "conceptual_captions": sizes["conceptual_captions/00000.tar"]}
    image_only = everything.filter(lambda j: j["source"] == "imagenet", input_columns="json")
    assert sorted(set(image_only["cls"])) == [0, 1, 2] and set(image_only["txt"]) == {None}


_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how HF stores a datasets.Image column


def _open_clip_size(shards: str) -> int:
    """open_clip's get_dataset_size (open_clip_train/data.py): expand the `::` and brace list, read sizes.json in
    the first shard's folder, sum the sizes by file name."""
    shards_list = wds.shardlists.expand_urls(shards)
    sizes = ast.literal_eval((Path(os.path.dirname(shards_list[0])) / "sizes.json").read_text())
    return sum(int(sizes[os.path.basename(shard)]) for shard in shards_list)


def test_open_clip_lists_and_sizes_work_across_sources(run_snippet, out):
    train_data = run_snippet("open_clip")["train_data"]
    pairs = listed(out, "shards_pairs.txt")
    assert [os.path.realpath(p) for p in wds.shardlists.expand_urls(train_data)] == [str(out / p) for p in pairs]
    sizes = json.loads((out / "sizes.json").read_text())
    assert _open_clip_size(train_data) == sum(sizes[p] for p in pairs)
    # a::b across sources, by the flat names of coco's and the text corpus's tars
    flat = {os.readlink(p).removeprefix("../"): p.name for p in sorted((out / "_flat").glob("pmd-*.tar"))}
    coco = sorted(flat[p] for p in pairs if p.startswith("coco/"))
    text = [flat[p] for p in listed(out, "shards_text.txt")]
    across = f"pmd_out/_flat/{{{','.join(coco)}}}::pmd_out/_flat/{text[0]}"
    assert _open_clip_size(across) == sum(sizes[p] for p in sizes if p.startswith(("coco/", "text_corpus/")))


def test_the_indexes_are_written_to_a_bucket_too(out, monkeypatch):
    with s3_server():
        remote = as_path("s3://bucket/pmd")
        write_build_indexes(remote, manifest(out))  # the saved manifest: its keys sorted, unlike the build's own
        write_card(remote, manifest(out))
        for name in ("sizes.json", "shardindex.json", "shards.txt", "shards_pairs.txt", "README.md"):
            assert (remote / name).read_bytes() == (out / name).read_bytes(), name
        assert (remote / "coco" / "sizes.json").read_bytes() == (out / "coco" / "sizes.json").read_bytes()
        assert not (remote / "_flat").exists()  # no links in an object store


def test_the_card_names_only_tars_and_says_what_the_build_is(out):
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    everything = listed(out, "shards.txt")
    configs = {c["config_name"]: c["data_files"][0]["path"] for c in front["configs"]}
    assert set(configs) == {"all", *manifest(out)["sources"]}
    for name, patterns in configs.items():
        matched = sorted(p.relative_to(out).as_posix() for pattern in _as_list(patterns) for p in out.glob(pattern))
        assert matched == sorted(p for p in everything if name == "all" or p.startswith(f"{name}/")), name
    assert all(info["features"] == hf_features() for info in front["dataset_info"])
    assert f"{manifest(out)['totals']['samples_written']:,} samples" in card
    assert all(f"| {get_source(name).info.license} |" in card for name in manifest(out)["sources"])


def _as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def test_rewritten_tars_get_fresh_indexes_with_the_manifest(out, tmp_path, monkeypatch):
    """`pmd tokenize` rewrites every tar (tokens added) and then the manifest: the indexes follow the new sizes."""
    from pmd_pipeline.manifest import write_manifest
    from pmd_pipeline.output import saved_config

    copy = tokenize_build(copy_build(out, tmp_path / "pmd_out"))
    write_manifest(saved_config(copy))
    index = json.loads((copy / "shardindex.json").read_text())
    assert index["shardlist"] and all(s["filesize"] == (copy / s["url"]).stat().st_size for s in index["shardlist"])
    assert json.loads((copy / "coco" / "shardindex.json").read_text())["shardlist"][0]["filesize"] == (
        (copy / "coco" / "00000.tar").stat().st_size
    )
    flat = sorted((copy / "_flat").glob("pmd-*.tar"))
    assert all(p.is_symlink() and p.read_bytes() == (copy / os.readlink(p)[3:]).read_bytes() for p in flat)
    assert "random" in (copy / "README.md").read_text()  # the card says what made the tokens
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    images = datasets.load_dataset(str(copy), "imagenet", split="train")
    grids = [np.asarray(g) for g in images["dvae.npy"]]
    assert len(grids) == len(tar_samples(copy, "imagenet")) and all(g.shape == (14, 14) for g in grids)
