"""`pmd show`: samples printed with their metadata, images and token grids written, clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.inspection.show import GRID_CELL, PALETTE
from tests.inspect_helpers import copy_build, tar_samples, tokenize_build

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenized(embedded_build, tmp_path_factory):
    return tokenize_build(copy_build(embedded_build[0], tmp_path_factory.mktemp("show") / "out"))


def flat(output: str) -> str:
    return " ".join(output.split())


def test_show_one_key_writes_its_image_and_token_grid(tokenized, tmp_path):
    key, sample = next((k, s) for k, s in tar_samples(tokenized, "conceptual_captions").items())
    meta = json.loads(sample["json"])
    result = runner.invoke(app, ["show", str(tokenized), key, "--to", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for text in (key, meta["captions"][0], meta["url"], meta["license"], "stored 224x224"):
        assert text in result.stdout, text
    assert (tmp_path / f"{key}.jpg").read_bytes() == sample["jpg"]
    tokens = np.load(io.BytesIO(sample["dvae.npy"]))
    grid = np.asarray(Image.open(tmp_path / f"{key}_tokens.png"))
    assert grid.shape == (14 * GRID_CELL, 14 * GRID_CELL, 3)
    assert (grid[::GRID_CELL, ::GRID_CELL] == PALETTE[tokens]).all()  # one cell per token, its code's colour


def test_show_a_text_only_sample_says_it_has_no_image(tokenized, tmp_path):
    key, sample = next(iter(tar_samples(tokenized, "text_corpus").items()))
    assert "jpg" not in sample and json.loads(sample["json"])["width"] == 0  # shards.schema: 0 without an image
    result = runner.invoke(app, ["show", str(tokenized), key, "--to", str(tmp_path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)
    assert "image none (a text-only sample)" in text and "tokens none (no image to tokenize)" in text
    assert "None" not in result.stdout and "size" not in result.stdout  # it printed "stored NonexNone"
    assert sample["txt"].decode().split()[0] in text and not list(tmp_path.iterdir())  # no image, no grid


def test_show_first_n_of_a_source(tokenized, tmp_path):
    result = runner.invoke(app, ["show", str(tokenized), "--source", "coco", "--n", "3", "--to", str(tmp_path)])
    assert result.exit_code == 0, result.output
    first_three = list(tar_samples(tokenized, "coco"))[:3]
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(f"{k}.jpg" for k in first_three)
    assert len(list(tmp_path.glob("*_tokens.png"))) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["coco_does_not_exist"], "no sample 'coco_does_not_exist'"),
        (["../etc"], "is not a sample key"),
        (["--source", "nope"], "no source 'nope'"),
        (["--n", "0"], "--n must be at least 1"),
    ],
)
def test_show_errors_are_one_line(tokenized, tmp_path, args, message):
    result = runner.invoke(app, ["show", str(tokenized), *args, "--to", str(tmp_path)])
    assert result.exit_code == 2 and message in flat(result.output), result.output


def test_show_explains_a_row_that_was_not_written(tokenized, tmp_path):
    import polars as pl

    dropped = pl.read_parquet(list(tokenized.glob("coco/0*.parquet"))).filter(pl.col("status") == "dropped")
    key, reason = dropped.row(0, named=True)["key"], dropped.row(0, named=True)["reason"]
    result = runner.invoke(app, ["show", str(tokenized), key, "--to", str(tmp_path)])
    assert result.exit_code == 2 and f"was not written: dropped ({reason})" in flat(result.output)


HOSTILE = "\x1b]0;pwned\x07\x1b[2J[bold]loud[/] closes [/] nothing, [unbalanced and ]] [[x] \x9b31m \u202eevil"


def hostile_build(tmp_path) -> tuple[Path, str]:
    """A one-sample build whose caption, url, licence and label carry terminal escapes and rich markup."""
    from tests.inspect_helpers import write_tar

    out, key = tmp_path / "out", "cc3m_0f8e9c1a2b3c4d5e6f70"
    (out / "_plan" / "conceptual_captions").mkdir(parents=True)
    (out / "_plan" / "conceptual_captions" / "_plan.json").write_text("{}")
    (out / "config.json").write_text("{}")
    (out / "conceptual_captions").mkdir()
    meta = {"captions": [HOSTILE], "url": f"http://x.example/[/]{HOSTILE}", "license": "[red]" + HOSTILE}
    meta["label"] = HOSTILE  # shards.schema: the class name is a top-level field
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, "JPEG")
    members = [(f"{key}.jpg", image.getvalue()), (f"{key}.txt", HOSTILE.encode())]
    write_tar(out / "conceptual_captions" / "00000.tar", [*members, (f"{key}.json", json.dumps(meta).encode())])
    return out, key


def test_show_prints_data_escaped_for_the_terminal_and_for_rich(tmp_path):
    out, key = hostile_build(tmp_path)
    args = ["show", str(out), "--source", "conceptual_captions", "--n", "1", "--to", str(tmp_path / "to")]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output  # rich markup in a caption used to crash it (MarkupError)
    assert not set(result.output) & set("\x1b\x07\x9b\u202e"), repr(result.output)  # no raw control character
    visible = "\\x1b]0;pwned\\x07\\x1b[2J[bold]loud[/] closes [/] nothing, [unbalanced and ]] [[x] \\x9b31m \\u202eevil"
    assert result.output.count(visible) == 4, result.output  # caption, url, licence, label: shown as written
    assert "[red]\\x1b]0;pwned" in result.output and (tmp_path / "to" / f"{key}.jpg").exists()
