"""End to end: `pmd pretrain` messages, a short run on fixture shards, and exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.train.config import load_train_config
from pmd_pipeline.train.trainer import train
from tests.train_fixtures import make_pmd, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pmd(tmp_path_factory.mktemp("pmd") / "out", per_shard=24, shards=2)


def _config(shards, run_dir, batch_size=8, **optim):
    cfg = load_train_config(None, run_dir=str(run_dir), vocab_size=200, log_every=100)
    cfg.data.shards, cfg.data.workers, cfg.data.batch_size = str(shards), 0, batch_size
    for key, value in {"steps": 8, "warmup_steps": 2, **optim}.items():
        setattr(cfg.optim, key, value)
    return cfg


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_default_pretrain_without_a_build_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["pretrain"])
    assert result.exit_code == 2 and "just build-pmd" in result.output
    make_shards(tmp_path / "pmd_out", "pairs", "cc3m", per_shard=2, tokens=False)  # built, not tokenized
    result = CliRunner().invoke(app, ["pretrain"])
    assert result.exit_code == 2 and "no dVAE tokens" in result.output and "just build-pmd" in result.output


def test_bad_config_is_one_line_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nbatch = 3\n")
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert result.exit_code == 2 and "unknown key(s) ['batch']" in result.output


@pytest.mark.slow  # ~1-4 minutes on a shared 2-core box
def test_losses_start_at_chance_and_fall(shards, tmp_path):
    cfg = _config(shards, tmp_path / "run", steps=24, lr=2e-3)
    # 12 paired, 6 image-only and 6 text-only steps: with 0.25 / 0.25 there were only 3 text steps, and
    # whether MLM fell by 0.3 in them turned on which passages the shuffled order gave first.
    cfg.data.mix = {"pairs": 0.5, "image": 0.2, "text": 0.3}
    rows = _log(train(cfg, say=lambda _: None))
    assert len(rows) == 24 and (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    series = {}
    for row in rows:
        for name, value in row["losses"].items():
            series.setdefault(name, []).append(value)
    assert set(series) == {"contrastive", "mmm_image", "mmm_text", "itm", "mim", "mlm"}
    assert abs(series["mmm_image"][0] - math.log(8192)) < 0.5  # chance: uniform over the codebook
    assert abs(series["itm"][0] - math.log(2)) < 0.1
    for name in ("mmm_image", "mim", "mmm_text", "mlm"):
        assert min(series[name][-3:]) < series[name][0] - 0.3, (name, series[name])
    last = rows[-1]
    assert set(last["task_mix"]) == {"pairs", "image", "text"} and last["samples_per_s"] > 0
    assert last["lr"] < cfg.optim.lr and "data_wait_s" in last


def test_a_run_repeats_and_resumes_with_the_same_losses(shards, tmp_path):
    whole = _config(shards, tmp_path / "whole", batch_size=4, steps=6, lr=2e-3)
    whole.checkpoint_every = 3
    whole.data.workers = 2
    expected = _log(train(whole, say=lambda _: None))

    # A second fresh run of the same config (its own WordPiece vocabulary, trained again) logs the same losses.
    again = _config(shards, tmp_path / "again", batch_size=4, steps=6, lr=2e-3)
    again.data.workers = 2
    assert [r["losses"] for r in _log(train(again, say=lambda _: None))] == [r["losses"] for r in expected]

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)  # same tokenizer; keep only the step-4 checkpoint
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:3]))
    resumed_cfg = _config(shards, cut, batch_size=4, steps=6, lr=2e-3)
    resumed_cfg.checkpoint_every, resumed_cfg.data.workers = 3, 2
    resumed = _log(train(resumed_cfg, resume=True, say=lambda _: None))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert {r["task"] for r in expected[3:]} >= {"pairs"}  # the resumed part includes a paired step
    for a, b in zip(expected[3:], resumed[3:], strict=True):
        assert a["task"] == b["task"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)


def test_resume_without_checkpoint_is_an_error(shards, tmp_path):
    from pmd_pipeline.errors import PmdError

    with pytest.raises(PmdError, match="no checkpoint"):
        train(_config(shards, tmp_path / "fresh"), resume=True, say=lambda _: None)
