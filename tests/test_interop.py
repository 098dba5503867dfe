"""The shards open unchanged in webdataset, in wids through the index `pmd verify` writes, and in Ray Data;
the per-shard parquet files open in polars and pyarrow."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pmd_pipeline.inspection.verify import run_verify
from tests.inspect_helpers import copy_build, tar_samples, tokenize_build


@pytest.fixture(scope="module")
def verified(embedded_build, tmp_path_factory):
    out = tokenize_build(copy_build(embedded_build[0], tmp_path_factory.mktemp("interop") / "out"))
    assert run_verify(out)
    return out


def manifest_samples(out) -> int:
    return json.loads((out / "manifest.json").read_text())["totals"]["samples_written"]


def test_webdataset_decodes_images_text_and_tokens(verified):
    tars = [str(p) for p in sorted(verified.glob("*/0*.tar"))]
    dataset = wds.WebDataset(tars, shardshuffle=False).decode("pil")
    count = 0
    for sample in dataset:  # pairs; image-only (imagenet: no txt); text-only (text_corpus: no jpg, no tokens)
        if sample["json"]["captions"]:
            assert sample["txt"] == sample["json"]["captions"][0]
        if "jpg" in sample:
            assert sample["jpg"].size == (224, 224)
            assert sample["dvae.npy"].shape == (14, 14) and sample["dvae.npy"].dtype == np.uint16
        count += 1
    assert count == manifest_samples(verified)


def test_wids_random_access_through_the_written_index(verified, tmp_path):
    import wids

    expected = tar_samples(verified, "conceptual_captions")
    index = verified / "conceptual_captions" / "shardindex.json"
    dataset = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "wids_cache"))
    assert len(dataset) == len(expected)
    for i in (0, len(dataset) // 2, len(dataset) - 1):  # random access across shards
        sample = dataset[i]
        raw = expected[sample["__key__"]]
        assert sample[".txt"] == raw["txt"].decode()
        assert sample[".json"]["captions"] == json.loads(raw["json"])["captions"]
        assert np.asarray(sample[".jpg"]).shape == (224, 224, 3)


def test_ray_data_reads_the_shards(verified, ray_session):
    import ray

    tars = [str(p) for p in sorted(verified.glob("*/0*.tar"))]
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert len(rows) == manifest_samples(verified)
    keys = {row["__key__"] for row in rows}
    assert keys == set(tar_samples(verified))
    with_image = {k for k, s in tar_samples(verified).items() if "jpg" in s}  # text-only samples have none
    images = [row for row in rows if row["__key__"] in with_image]
    bad = [row["__key__"] for row in images if not (isinstance(row["jpg"], bytes) and row.get("dvae.npy"))]
    assert len(images) == len(with_image) and not bad, bad[:5]


def test_parquet_opens_in_polars_and_pyarrow(verified):
    for stats_file in verified.glob("*/0*_stats.json"):
        stats = json.loads(stats_file.read_text())
        parquet = stats_file.with_name(stats["shard"] + ".parquet")
        table = pq.read_table(parquet)
        frame = pl.read_parquet(parquet)
        assert table.num_rows == frame.height == stats["rows_in"]
        assert frame.filter(pl.col("status") == "written").height == stats["samples_written"]
        assert set(table.column("status").to_pylist()) <= {"written", "dropped", "failed"}
