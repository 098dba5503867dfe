"""`pmd plan`: what it predicts for the embedded default is what the build then makes."""

from __future__ import annotations

import json
import subprocess
import sys

from pmd_pipeline.embedded import default_config
from pmd_pipeline.estimate import Cluster, plan_config
from shards.stats import collect_stats


def test_the_plan_of_the_embedded_default_matches_its_build(embedded_build):
    out, _ = embedded_build
    report = plan_config(default_config(str(out)), Cluster(nodes=2, cpus_per_node=16))
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
