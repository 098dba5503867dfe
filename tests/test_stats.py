"""`pmd stats`: exact counts from the shard stats files, the paper's figures, distributions, tokens, JSON, plots."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from shards.stats import collect_stats, evenly_spaced, source_names, written_rows
from sources import REGISTRY
from tests.inspect_helpers import CODEBOOK_ID, copy_build, tar_samples, tokenize_build

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenized(embedded_build, tmp_path_factory):
    return tokenize_build(copy_build(embedded_build[0], tmp_path_factory.mktemp("stats") / "out"))


def test_counts_match_the_manifest_and_the_rows(embedded_build):
    out, _ = embedded_build
    report = collect_stats(out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("shards", "rows_in", "samples_written", "pairs_written", "rejected_raw_records"):
        assert report["total"][key] == manifest["totals"][key], key
    # per-source parquet schemas differ (each source's filter scores): read the common columns
    rows = pl.concat([pl.read_parquet(p, columns=["status", "reason"]) for p in out.glob("*/0*.parquet")])
    failed = dict(rows.filter(pl.col("status") == "failed")["reason"].value_counts().iter_rows())
    assert report["total"]["rows_failed"] == dict(sorted(failed.items(), key=lambda kv: -kv[1]))
    assert report["sources"]["conceptual_captions"]["rejected_by_reason"] == {"wrong_column_count": 1}
    attempted = report["total"]["fetch_attempted"]
    assert report["total"]["fetch_success_rate"] == round(1 - sum(failed.values()) / attempted, 4)


def test_caption_words_agree_with_the_captions_in_the_tars(embedded_build):
    out, _ = embedded_build
    report = collect_stats(out, sample_shards=0)
    for name, summary in report["sources"].items():
        words = [len(c.split()) for s in tar_samples(out, name).values() for c in json.loads(s["json"])["captions"]]
        assert summary["pairs_written"] == len(words)
        if not words:  # image-only samples (imagenet) have no caption
            continue
        assert summary["mean_caption_words"] == round(sum(words) / len(words), 2)
        assert summary["distribution"]["caption_words"]["p50"] == float(np.median(words))
        assert summary["distribution"]["shards_read"] == summary["shards"]


def test_paper_figures_come_from_the_registry(embedded_build):
    from pmd_pipeline.inspection.stats_view import with_paper_figures

    report = with_paper_figures(collect_stats(embedded_build[0]))
    for name, summary in report["sources"].items():
        info = REGISTRY[name].info
        expected = {"pairs_millions": info.paper_pairs, "mean_words": info.paper_avg_words, "group": None}
        if name.startswith("localized_narratives__"):
            expected["group"] = "localized_narratives"
        assert summary["paper"] == (expected if info.paper_pairs else None)  # unimodal sources: not in the table
    # Localized Narratives' 1.9M is for its four subsets together: the three built here count it once
    assert sum(name.startswith("localized_narratives__") for name in report["sources"]) == 3
    infos = {(REGISTRY[n].info.paper_group or n): REGISTRY[n].info for n in report["sources"]}
    infos = [i for i in infos.values() if i.paper_pairs]
    weighted = sum(i.paper_pairs * i.paper_avg_words for i in infos) / sum(i.paper_pairs for i in infos)
    assert report["total"]["paper"] == {"pairs_millions": 70.0, "mean_words": round(weighted, 2)}  # not 73.8


@pytest.mark.parametrize("subsets", [["coco"], ["coco", "openimages", "ade20k", "flickr30k"]])
def test_localized_narratives_paper_pairs_count_once_however_many_subsets(subsets):
    from pmd_pipeline.inspection.stats_view import with_paper_figures
    from sources import paper_total

    names = [n for n in REGISTRY if not n.startswith("localized_narratives__")]
    names += [f"localized_narratives__{subset}" for subset in subsets]
    report = with_paper_figures({"sources": {name: {} for name in names}, "total": {}})
    assert report["total"]["paper"]["pairs_millions"] == 70.0  # FLAVA's Table 2: 70M (was 75.7 with all four)
    assert paper_total(["coco", *names[-len(subsets) :]]) == {"pairs_millions": 2.8, "mean_words": 13.35}
    assert paper_total(["imagenet", "text_corpus"]) is None


def test_tokens_are_summarised_from_the_sidecars(tokenized):
    report = collect_stats(tokenized)
    tokens = report["total"]["tokens"]
    samples = {k: s for k, s in tar_samples(tokenized).items() if "jpg" in s}  # text-only samples have no tokens
    codes = np.concatenate([np.load(io.BytesIO(s["dvae.npy"])).ravel() for s in samples.values()])
    assert tokens["tokenized_fraction"] == 1.0 and tokens["samples_with_image"] == len(samples)
    assert tokens["codebooks"] == [CODEBOOK_ID] and tokens["codebook_random"]
    assert tokens["samples_tokenized"] == len(samples)
    assert tokens["codes_used"] == len(np.unique(codes))
    top_code, top_count = tokens["top_codes"][0]
    assert top_count == int((codes == top_code).sum()) == np.bincount(codes).max()
    on_disk = sum(p.stat().st_size for p in tokenized.glob("*/0*.tar"))
    assert report["total"]["tar_bytes"] == on_disk  # the rewritten tars' sizes, from the sidecars


def test_partly_tokenized_build_reports_the_fraction_of_samples(embedded_build, tmp_path):
    """The fraction counts samples with an image, as `pmd verify`'s "with tokens" does, not shards."""
    out = tokenize_build(copy_build(embedded_build[0], tmp_path / "out"), only=2)
    tokens = collect_stats(out)["total"]["tokens"]
    samples = tar_samples(out)
    with_image = sum("jpg" in s for s in samples.values())
    with_tokens = sum("dvae.npy" in s for s in samples.values())
    assert tokens["shards_tokenized"] == 2 and 0 < with_tokens < with_image
    assert (tokens["samples_tokenized"], tokens["samples_with_image"]) == (with_tokens, with_image)
    assert tokens["tokenized_fraction"] == round(with_tokens / with_image, 4)


def test_a_text_only_source_has_nothing_to_tokenize(tokenized):
    """text_corpus's shards have sidecars (the stage ran) but no images: not applicable, not 100%."""
    report = collect_stats(tokenized)
    text = report["sources"]["text_corpus"]["tokens"]
    assert text["shards_tokenized"] == report["sources"]["text_corpus"]["shards"] > 0
    assert (text["samples_tokenized"], text["samples_with_image"], text["tokenized_fraction"]) == (0, 0, None)
    result = runner.invoke(app, ["stats", str(tokenized)], env={"COLUMNS": "120"})
    counts_row, content_row = [line for line in result.stdout.splitlines() if line.startswith("│ text_corpus ")]
    assert content_row.rstrip(" │").endswith("│ no images") and "%" not in content_row


def test_cli_json_narrowed_to_one_source(tokenized):
    result = runner.invoke(app, ["stats", str(tokenized), "--json", "--source", "coco", "--codes"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["sources"]) == ["coco"]
    assert report["total"]["samples_written"] == report["sources"]["coco"]["samples_written"] > 0
    assert "code_counts" not in report["total"]["tokens"] and report["total"]["tokens"]["codes_used"] > 0


def test_code_counts_are_read_only_when_asked_for(tokenized):
    result = runner.invoke(app, ["stats", str(tokenized), "--json"])
    tokens = json.loads(result.stdout)["total"]["tokens"]
    assert tokens["codes_used"] is None and tokens["top_codes"] is None
    assert tokens["samples_tokenized"] == collect_stats(tokenized)["total"]["tokens"]["samples_tokenized"] > 0


def test_damaged_sidecar_is_a_clear_error(tokenized, tmp_path):
    out = copy_build(tokenized, tmp_path / "out")
    (out / "coco/00000_dvae.json").write_text('{"code_counts": [1, 2, 3], "codebook": ')
    result = runner.invoke(app, ["stats", str(out)])
    assert result.exit_code == 2 and "unreadable dVAE sidecar" in " ".join(result.output.split())


def test_damaged_stats_file_is_a_clear_error_and_stray_sidecars_do_not_count(tokenized, tmp_path):
    out = copy_build(tokenized, tmp_path / "out")
    (out / "coco/00007_dvae.json").write_text((out / "coco/00000_dvae.json").read_text())  # no shard 00007
    assert collect_stats(out)["total"]["tokens"]["tokenized_fraction"] == 1.0
    (out / "coco/00001_stats.json").write_text("{")
    result = runner.invoke(app, ["stats", str(out)])
    assert result.exit_code == 2 and "unreadable shard stats" in " ".join(result.output.split())


def test_code_counts_of_the_wrong_length_are_a_clear_error(tokenized, tmp_path):
    out = copy_build(tokenized, tmp_path / "out")
    sidecar = json.loads((out / "coco/00000_dvae.json").read_text())
    sidecar["code_counts"] = sidecar["code_counts"][:100]
    (out / "coco/00000_dvae.json").write_text(json.dumps(sidecar))
    assert runner.invoke(app, ["stats", str(out)]).exit_code == 0  # the counts are not read without --codes
    result = runner.invoke(app, ["stats", str(out), "--codes"])
    assert result.exit_code == 2 and "100 code counts, expected 8192" in " ".join(result.output.split())


def test_cli_table_shows_paper_figures_and_codebook(tokenized):
    result = runner.invoke(app, ["stats", str(tokenized), "--wide"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "paper pairs" in result.stdout and "0.9M" in result.stdout and "3.1M" in result.stdout
    assert "12.4" in result.stdout and "10.3" in result.stdout  # the paper's mean words for COCO and CC3M
    total = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("total"))
    assert " 70M " in total and "73.8M" not in result.stdout  # LN's 1.9M counted once, not per subset
    assert result.stdout.count("1.9M*") == 3 and "one figure for its 4 subsets together" in result.stdout
    assert "RANDOM" in result.stdout and "100%" in result.stdout
    assert "test tokens from a random generator" in result.stdout  # the manifest's note


def test_redirected_tables_are_not_cut_to_80_columns(tokenized):
    """Piped or written to a file (CliRunner is neither a terminal), rich would assume 80 columns and cut
    names to a few letters; the tables get the width they want instead."""
    result = runner.invoke(app, ["stats", str(tokenized)], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert "conceptual_captions" in result.stdout and "paper pairs" in result.stdout
    assert "fetch ok" in result.stdout and "random codebook" in result.stdout
    narrow = runner.invoke(app, ["stats", str(tokenized)], env={"COLUMNS": "80"})  # an explicit width is kept
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80


@pytest.mark.parametrize("wide", [False, True])
def test_tables_fit_120_columns_with_every_source_name_whole(tokenized, wide):
    """A 120-column terminal shows every table without cutting a source name (it needed ~200 columns)."""
    args = ["stats", str(tokenized), "--codes"] + (["--wide"] if wide else [])
    result = runner.invoke(app, args, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│ ") and line.split("│")[1].strip()]
    tables = 4 if wide else 2
    for name in [*source_names(tokenized), "total"]:
        assert names.count(name) == tables, name  # each table, whole: a cut name ("conceptu…") would not count
    assert "…" not in "".join(names)


def test_wide_adds_the_reasons_and_the_codebooks(tokenized):
    narrow = runner.invoke(app, ["stats", str(tokenized), "--codes"], env={"COLUMNS": "120"}).stdout
    wide = runner.invoke(app, ["stats", str(tokenized), "--codes", "--wide"], env={"COLUMNS": "120"}).stdout
    report = collect_stats(tokenized)
    reason, count = next(iter(report["total"]["rows_failed"].items()))
    for text in ("┃ rows in", "┃ malformed", "┃ top reasons", f"failed  {reason} {count}", "RANDOM", "300/8192"):
        assert text in wide and text not in narrow, text
    assert "--wide adds" in narrow and "--wide adds" not in wide
    images = report["total"]["tokens"]["samples_with_image"]
    total = next(line for line in wide.splitlines() if line.startswith("│ total") and "RANDOM" in line)
    assert f" {images:,} " in total  # the tokens table counts images, the figure the fraction is of


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--source", "nope"], "no source 'nope'"), (["--sample-shards", "-1"], "--sample-shards")],
)
def test_cli_errors_are_one_line(embedded_build, args, message):
    result = runner.invoke(app, ["stats", str(embedded_build[0]), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_not_a_build_folder(tmp_path):
    result = runner.invoke(app, ["stats", str(tmp_path)])
    assert result.exit_code == 2 and "not a pmd build output" in " ".join(result.output.split())


def test_plots_are_written_as_png(tokenized, tmp_path):
    result = runner.invoke(app, ["stats", str(tokenized), "--plots", str(tmp_path / "plots"), "--json"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["caption_words.png", "codebook_usage.png", "failure_reasons.png", "image_sizes.png"]
    for name in names:
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.format == "PNG" and image.width >= 600


def test_no_codebook_chart_when_only_text_shards_were_tokenized(embedded_build, tmp_path):
    from tests.inspect_helpers import tokenize_shard

    out = copy_build(embedded_build[0], tmp_path / "out")
    tokenize_shard(out / "text_corpus" / "00000.tar", np.random.default_rng(0))  # a sidecar, no images
    result = runner.invoke(app, ["stats", str(out), "--plots", str(tmp_path / "plots"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"]["tokens"]["shards_tokenized"] == 1
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "caption_words.png",
        "failure_reasons.png",
        "image_sizes.png",
    ]


@pytest.fixture(scope="module")
def charted(tokenized):
    """(report with code counts, written rows per source, colours): what write_plots draws from."""
    from pmd_pipeline.inspection.plots import source_colours
    from pmd_pipeline.inspection.stats_view import with_paper_figures

    report = with_paper_figures(collect_stats(tokenized, sample_shards=0))
    rows = {name: written_rows(tokenized, name, 0)[0] for name in report["sources"]}
    return report, rows, source_colours(list(report["sources"]))


def test_caption_bins_cover_the_longest_passage_of_every_source(charted):
    from pmd_pipeline.inspection.plots import caption_length_figure

    report, rows, colours = charted
    panels = {ax.get_title().split(" (")[0]: ax for ax in caption_length_figure(rows, report, colours).axes}
    longest = {}
    for name, frame in rows.items():
        words = frame["words"].list.explode().drop_nulls().to_numpy()
        if not len(words):
            continue
        bars = panels[name].patches
        longest[name] = int(words.max())
        assert sum(bar.get_height() for bar in bars) == len(words), name  # no caption outside the bins
        assert bars[-1].get_x() + bars[-1].get_width() > words.max() >= bars[-1].get_x(), name
        assert {bar.get_facecolor()[:3] for bar in bars} == {tuple(colours[name][:3])}
    assert longest["text_corpus"] > 80  # the passages the old 80-word cap cut off


def test_an_image_only_source_says_no_captions(charted):
    from pmd_pipeline.inspection.plots import caption_length_figure

    report, rows, colours = charted
    imagenet = next(
        ax for ax in caption_length_figure(rows, report, colours).axes if ax.get_title().startswith("imagenet")
    )
    assert not imagenet.patches
    images = report["sources"]["imagenet"]["samples_written"]
    assert [t.get_text() for t in imagenet.texts] == [f"no captions\n({images:,} images without text)"]


def test_every_source_has_a_colour_of_its_own(charted):
    from pmd_pipeline.inspection.plots import image_size_figure, source_colours

    report, rows, colours = charted
    for names in (list(REGISTRY), [f"source_{i}" for i in range(25)]):  # 14 sources outgrew the 10-colour cycle
        assert len(set(source_colours(names).values())) == len(names)
    sizes = image_size_figure(rows, colours).axes[0]
    drawn = {c.get_label(): tuple(c.get_facecolor()[0][:3]) for c in sizes.collections}
    with_images = [n for n, f in rows.items() if f["original_width"].drop_nulls().len()]
    assert sorted(drawn) == sorted(with_images) and "text_corpus" not in drawn and len(drawn) > 10
    assert len(set(drawn.values())) == len(drawn)
    assert all(drawn[n] == tuple(colours[n][:3]) for n in drawn)  # the same colour as its caption panel


def test_codebook_usage_is_on_log_axes_with_every_used_code(charted):
    from pmd_pipeline.inspection.plots import codebook_figure

    report, _, _ = charted
    tokens = report["total"]["tokens"]
    rank = codebook_figure(report).axes[0]
    assert rank.get_xscale() == rank.get_yscale() == "log"
    (line,) = rank.lines
    x, y = line.get_data()
    assert len(x) == tokens["codes_used"] == 300 and y.min() > 0  # no unused code squashed onto the axis
    right = rank.transAxes.inverted().transform(rank.transData.transform((x.max(), y.min())))[0]
    assert right > 0.6  # the 300 used codes span most of the width (on a linear axis: the first 4%)
    assert y[0] == tokens["top_codes"][0][1]
    assert f"{8192 - 300:,} codes never used" in [t.get_text() for t in rank.get_legend().get_texts()]


def test_the_bench_baseline_reads_the_same_numbers_from_the_tars(tmp_path):
    from benchmarks.bench_stats import make_build, numbers_from_tars

    out = make_build(tmp_path / "out", shards=8)
    total = collect_stats(out, sample_shards=0)["total"]
    from_tars = numbers_from_tars(sorted(out.glob("*/0*.tar")))
    assert from_tars["samples"] == total["samples_written"] == total["tokens"]["samples_tokenized"]
    assert from_tars["pairs"] == total["pairs_written"]
    assert from_tars["codes_used"] == total["tokens"]["codes_used"]
    words = pl.concat([written_rows(out, name, 0)[0]["words"].list.explode() for name in source_names(out)])
    assert from_tars["median_words"] == words.median()


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(list(range(10)), 3) == [0, 4, 9]  # round(4.5) is 4: banker's rounding, still spread
    assert evenly_spaced(list(range(10)), 0) == list(range(10))
    assert evenly_spaced([1, 2], 5) == [1, 2]
