"""`pmd plan`: what it predicts for the embedded default is what the build then makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pmd_pipeline.config_file import load_config
from pmd_pipeline.embedded import default_config, materialize
from pmd_pipeline.estimate import Cluster, input_files, plan_config
from pmd_pipeline.fetch.mirror import StaticServer, use_mirror
from shards.stats import collect_stats
from sources import REGISTRY
from sources.published import MANUAL_STEPS, PUBLISHED

RECIPE = Path(__file__).parents[1] / "configs" / "pmd.toml"


def test_the_plan_of_the_embedded_default_matches_its_build(embedded_build):
    """The build downloaded the embedded metadata through its mirror: the plan counts them where they landed,
    and sizes every input (URLs through the same mirror)."""
    out, _ = embedded_build
    cfg = default_config(str(out))
    with StaticServer(materialize(cfg.out) / "mirror") as server:
        use_mirror(cfg.fetch, server.url)
        report = plan_config(cfg, Cluster(nodes=2, cpus_per_node=16))
    built = collect_stats(out, codes=False)["sources"]
    assert [s["source"] for s in report["sources"]] == sorted(built, key=[s["source"] for s in report["sources"]].index)
    for planned in report["sources"]:
        got = built[planned["source"]]
        assert planned["estimate"] == "counted"  # the embedded sample is smaller than the rules' sample
        assert planned["shards"] == got["shards"], planned["source"]
        # kept by the source's rules = written + failed fetching (the plan cannot know which links are dead)
        assert planned["expected_samples"] == got["samples_written"] + sum(got["rows_failed"].values()), planned
        assert planned["expected_pairs"] >= got["pairs_written"]
        assert all(f["bytes"] for f in planned["files"]), planned["files"]  # every input found and sized
    totals = report["totals"]
    assert totals["shards"] == sum(s["shards"] for s in built.values())
    assert totals["peak_disk_bytes"] > totals["output_bytes"] > 0
    assert 0 < totals["hours"]["build"] < 1


def test_pmd_plan_prints_a_table_and_json(embedded_build, tmp_path):
    cmd = [sys.executable, "-m", "pmd_pipeline.cli", "plan", "--out", str(tmp_path / "out"), "--nodes", "4"]
    table = subprocess.run(cmd, capture_output=True, text=True, env={"COLUMNS": "120", "PATH": ""}, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "conceptual_captions" in table.stdout and "on 4 node(s)" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 120
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["cluster"]["nodes"] == 4 and len(report["sources"]) == 13


def test_the_recipe_names_every_source_at_its_published_place():
    """configs/pmd.toml: every registered source, each URL one its publisher gives (sources/published.py),
    the manual steps local or off, and the embedded default the same recipe at small scale."""
    cfg = load_config(RECIPE)
    assert sorted(s.name for s in cfg.sources) == sorted(REGISTRY)
    for source in cfg.sources:
        urls = [f for f in input_files(source) if "://" in f]
        assert set(urls) <= set(PUBLISHED[source.name]), source.name
        if source.name in MANUAL_STEPS:  # what needs the manual step is a local path the user fills
            assert any("://" not in f for f in input_files(source)), source.name
    assert not next(s for s in cfg.sources if s.name == "localized_narratives__flickr30k").enabled
    embedded = {s.name: set(input_files(s)) for s in default_config("/tmp/x").sources}
    for source in cfg.sources:
        remote = {f for f in embedded.get(source.name, ()) if "://" in f}
        assert remote <= set(PUBLISHED[source.name]), source.name


@pytest.mark.parametrize("missing", ["yfcc100m", "imagenet"])
def test_a_missing_manual_step_stops_the_build_before_any_work_saying_what_to_get(tmp_path, missing):
    cfg = load_config(RECIPE)
    cfg.out = str(tmp_path / "out")
    from pmd_pipeline.build import validate
    from pmd_pipeline.errors import PmdError

    with pytest.raises(PmdError) as err:
        validate(cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 3  # YFCC100M, ImageNet, the text corpus: one line each, all at once
    line = next(line for line in lines if line.startswith(f"source {missing} "))
    assert "needs a manual step" in line and "http" in line and str(RECIPE.parent / "manual") in line
    assert not (tmp_path / "out").exists()


def test_the_recipe_planned_against_a_mirror_sizes_what_it_serves_and_names_what_it_lacks(tmp_path):
    """configs/pmd.toml through the embedded mirror (which serves the bundled files at their canonical URLs):
    exact sizes for what it has, unknown (listed) for the rest, and the plan still ends."""
    cfg = load_config(RECIPE)
    cfg.out = str(tmp_path / "out")
    root = materialize(str(tmp_path / "embedded"))
    with StaticServer(root / "mirror") as server:
        use_mirror(cfg.fetch, server.url)
        report = plan_config(cfg, Cluster(nodes=8, cpus_per_node=32, gpus_per_node=8))
    sizes = {f["path"]: f["bytes"] for s in report["sources"] for f in s["files"]}
    karpathy = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
    served = root / "mirror" / "cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
    assert sizes[karpathy] == served.stat().st_size
    lacking = "https://storage.googleapis.com/gresearch/wit/wit_v1.train.all-00009-of-00010.tsv.gz"
    assert sizes[lacking] is None and lacking in report["totals"]["unknown_sizes"]
    totals = report["totals"]
    assert 65e6 < totals["expected_pairs"] < 75e6  # the paper's 70M where the metadata was not counted
    assert totals["hours"]["build"] > 0 and totals["output_bytes"] > 1e12
