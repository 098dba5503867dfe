"""End to end: `pmd pretrain` messages, a short run on fixture shards, and exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import as_dict, load_train_config
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


def tensorboard_scalars(run_dir) -> dict[str, list]:
    """What TensorBoard shows of a run folder: tag -> events (step, value), replaced steps purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=True).Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def tensorboard_steps(run_dir, tag: str) -> list[int]:
    return [e.step for e in tensorboard_scalars(run_dir)[tag]]


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
    shutil.copytree(tmp_path / "whole", cut)  # same tokenizer, log and TensorBoard events; drop the last checkpoint
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    resumed_cfg = _config(shards, cut, batch_size=4, steps=6, lr=2e-3)
    resumed_cfg.checkpoint_every, resumed_cfg.data.workers = 3, 2
    resumed = _log(train(resumed_cfg, resume=True, say=lambda _: None))
    # Steps 4-6, replayed after the step-3 checkpoint, replace the old ones: each step once, in log and TensorBoard.
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert tensorboard_steps(cut, "loss/pairs/total") == sorted(r["step"] for r in resumed if r["task"] == "pairs")
    assert {r["task"] for r in expected[3:]} >= {"pairs"}  # the resumed part includes a paired step
    for a, b in zip(expected[3:], resumed[3:], strict=True):
        assert a["task"] == b["task"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)


def test_resume_without_checkpoint_is_an_error(shards, tmp_path):
    with pytest.raises(PmdError, match="no checkpoint"):
        train(_config(shards, tmp_path / "fresh"), resume=True, say=lambda _: None)


def test_accumulated_run_logs_metrics_a_person_reads(shards, tmp_path):
    """global_batch 16 = 8 per rank x 1 rank x 2 micro-batches; every metric in log.jsonl and TensorBoard, the lr
    of the step it was used on, steps done / total and ETA in the progress line, a closing message and a PNG."""
    cfg = _config(shards, tmp_path / "run", steps=4, global_batch=16, warmup_steps=2)
    cfg.log_every, cfg.checkpoint_every = 1, 2
    cfg.data.mix = {"pairs": 0.5, "image": 0.25, "text": 0.25}
    lines = []
    rows = _log(train(cfg, say=lines.append))
    assert "global batch 16 = 8 per rank x 1 ranks x 2 accumulated" in lines
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # lr: the step's own (warmup 1/2, 2/2, then the cosine from its top), not the next step's
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 / 2, 1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))])
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    import torch

    assert torch.load(checkpoint, weights_only=False)["consumed_batches"] == {
        task: 2 * sum(r["task"] == task for r in rows) for task in {r["task"] for r in rows}
    }  # two micro-batches a step
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 4 and progress[0].startswith("step     1/4") and "ETA" in progress[0]
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 for r in rows)
    scalars = tensorboard_scalars(tmp_path / "run")
    assert {"lr", "grad_norm", "samples_per_s"} <= set(scalars)
    for row in rows:
        for name, value in row["losses"].items():
            (event,) = [e for e in scalars[f"loss/{row['task']}/{name}"] if e.step == row["step"]]
            assert event.value == pytest.approx(value, abs=1e-5)
    assert [e.value for e in scalars["lr"]] == pytest.approx([r["lr"] for r in rows])
    png = tmp_path / "run" / "losses.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1].startswith("done: 4 steps") and str(checkpoint) in lines[-1] and str(png) in lines[-1]


def test_a_finished_run_folder_is_not_trained_over_and_resume_refuses_a_changed_recipe(shards, tmp_path):
    run = tmp_path / "run"
    cfg = _config(shards, run, batch_size=4, steps=2)
    train(cfg, say=lambda _: None)
    before = (run / "log.jsonl").read_text()

    result = CliRunner().invoke(app, ["pretrain", str(_toml(tmp_path, shards, run))])
    assert result.exit_code == 2 and "already holds checkpoints" in result.output and "--resume" in result.output
    assert "--run-dir" in result.output and (run / "log.jsonl").read_text() == before  # nothing touched

    changed = _config(shards, run, batch_size=4, steps=2, lr=5e-4)
    changed.data.mix = {"pairs": 1.0}
    with pytest.raises(PmdError, match=r"changes what .* trains: data.mix .*, optim.lr \(0.001 -> 0.0005\)"):
        train(changed, resume=True, say=lambda _: None)
    assert (run / "log.jsonl").read_text() == before

    # What may change: logging, checkpointing, workers, and the length (a longer run continues this one).
    longer = _config(shards, run, batch_size=4, steps=3)
    longer.log_every, longer.checkpoint_every, longer.data.workers = 1, 7, 1
    rows = _log(train(longer, resume=True, say=lambda _: None))
    assert [r["step"] for r in rows] == [1, 2, 3] and "".join(_log_lines(run)[:2]) == before

    # A new folder for the same config is the other way out.
    result = CliRunner().invoke(app, ["pretrain", str(_toml(tmp_path, shards, run)), "--run-dir", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert [r["losses"] for r in _log(tmp_path / "b")] == [r["losses"] for r in rows[:2]]


def _log_lines(run_dir) -> list[str]:
    return (run_dir / "log.jsonl").read_text().splitlines(keepends=True)


def _toml(tmp_path, shards, run_dir):
    """The TOML of _config(shards, run_dir, batch_size=4, steps=2), for the CLI: every key written out, so the
    two stay equal whatever the defaults of default.toml and of the dataclasses become."""
    cfg = as_dict(_config(shards, run_dir, batch_size=4, steps=2))
    tables = {k: v for k, v in cfg.items() if isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if k not in tables]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # str, int, float and bool are written alike in JSON and TOML


def test_global_batch_that_does_not_divide_is_refused_before_anything_is_written(shards, tmp_path):
    cfg = _config(shards, tmp_path / "run", global_batch=12)
    with pytest.raises(PmdError, match=r"optim.global_batch = 12 .* 8 x 1 = 8"):
        train(cfg, say=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # W&B's service process takes ~30 s to start and stop on a shared 2-core box
def test_wandb_logs_the_run_when_asked_and_a_fresh_run_starts_its_log_over(shards, tmp_path, monkeypatch):
    """metrics.wandb = true: the run also logs to Weights & Biases (offline here: files in the run folder)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "task": "left by an attempt killed before its first checkpoint"}\n')
    cfg = _config(shards, run, batch_size=4, steps=2)
    cfg.metrics.wandb = True
    rows = _log(train(cfg, say=lambda _: None))
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["task"] in ("pairs", "image", "text")  # started over
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert (run / "wandb_id").read_text() in offline.name and list(offline.glob("*.wandb"))
