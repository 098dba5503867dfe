"""The `pmd` command: bad input gets one clear line and a non-zero exit, and nothing is overwritten."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def write_config(tmp_path, text: str):
    path = tmp_path / "build.toml"
    path.write_text(text)
    return path


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output  # never wrapped
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_unreadable_config(tmp_path):
    one_line_error(run("build", "--config", str(write_config(tmp_path, "out = [unclosed"))), "not valid TOML")


def test_a_long_error_stays_one_line_for_logs_and_grep(tmp_path):
    """rich wrapped messages at the console's width (80 columns off a terminal), splitting paths."""
    config = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 3) / "nope.toml"
    one_line_error(run("build", "--config", str(config)), "config file not found", str(config))


def test_missing_config(tmp_path):
    one_line_error(run("build", "--config", str(tmp_path / "nope.toml")), "config file not found")


def test_unknown_source(tmp_path):
    cfg = write_config(tmp_path, '[sources.flickr8k]\nmetadata = ["x.tsv"]\n')
    one_line_error(run("build", "--config", str(cfg)), "unknown source 'flickr8k'", "valid sources:", "coco")


def test_unknown_filter(tmp_path):
    (tmp_path / "cc.tsv").write_text("a cat on a mat\thttp://x/y.jpg\n")
    cfg = write_config(tmp_path, '[[filters]]\nname = "nsfw"\n[sources.conceptual_captions]\nmetadata = ["cc.tsv"]\n')
    one_line_error(run("build", "--config", str(cfg)), "unknown filter 'nsfw'", "caption_length")


def test_messages_keep_their_brackets(tmp_path):
    """rich would read '[sources.coco]' in a message as a style tag and drop it."""
    cfg = write_config(tmp_path, "[sources]\ncoco = 3\n")
    one_line_error(run("build", "--config", str(cfg)), "[sources.coco] must be a table")


def test_unknown_config_key(tmp_path):
    cfg = write_config(tmp_path, "shard_sise = 10\n")
    one_line_error(run("build", "--config", str(cfg)), "unknown key(s) shard_sise")


def test_missing_metadata_file(tmp_path):
    cfg = write_config(tmp_path, '[sources.conceptual_captions]\nmetadata = ["missing.tsv"]\n')
    one_line_error(run("build", "--config", str(cfg)), "metadata file not found", "missing.tsv")


def test_missing_image_archive(tmp_path):
    (tmp_path / "k.json").write_text('{"images": []}')
    cfg = write_config(tmp_path, '[sources.coco]\nmetadata = ["k.json"]\nimages = {train2014 = "gone.zip"}\n')
    one_line_error(run("build", "--config", str(cfg)), "image archive `train2014` not found")


def test_output_of_another_config_is_refused_and_untouched(embedded_build, tmp_path):
    out, _ = embedded_build
    (tmp_path / "cc.tsv").write_text("a cat on a mat\thttp://x/y.jpg\n")
    cfg = write_config(tmp_path, f'out = "{out}"\n[sources.conceptual_captions]\nmetadata = ["cc.tsv"]\n')
    before = (out / "config.json").read_bytes()
    one_line_error(run("build", "--config", str(cfg)), "was built with a different config")
    assert (out / "config.json").read_bytes() == before


def test_sources_lists_every_registered_source():
    from sources import REGISTRY

    result = run("sources")
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output
    text = " ".join(result.output.split())  # rich may wrap long lines
    assert text.count("1.9M pairs") == 4 and text.count("for the 4 localized_narratives subsets together") == 4
    assert "PMD in FLAVA's Table 2: 70M pairs" in text  # LN's figure counted once, not 75.7M


def test_stats_json_matches_the_shard_files(embedded_build):
    out, _ = embedded_build
    result = run("stats", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    cc3m = report["sources"]["conceptual_captions"]
    assert (cc3m["rows_in"], cc3m["samples_written"], cc3m["rejected_raw_records"]) == (201, 191, 1)
    assert cc3m["rows_failed"] == {"http_404": 6, "decode_error": 3, "url_scheme_not_allowed": 1}
    assert cc3m["samples_written"] + report["sources"]["coco"]["samples_written"] == 246
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["total"]["samples_written"] == manifest["totals"]["samples_written"]
    assert report["total"]["pairs_written"] == sum(s["pairs_written"] for s in report["sources"].values())


@pytest.mark.parametrize("args", [("stats", "/nonexistent"), ("stats", ".", "--source", "x")])
def test_stats_on_a_non_build_folder(args):
    one_line_error(run(*args), "not a pmd build output")
