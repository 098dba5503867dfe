"""The training loop: one task per step (same on every rank), AdamW + warmup/cosine, JSONL log, checkpoints."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.checkpoint import check_codebook, last_checkpoint, read_checkpoint, save_checkpoint
from pmd_pipeline.train.config import TrainConfig, as_dict
from pmd_pipeline.train.data import TaskStream, make_loader
from pmd_pipeline.train.distributed import (
    barrier,
    drop_unused_grads,
    gather_rng_states,
    init_distributed,
    is_fsdp,
    next_batch_everywhere,
    prepare_training,
)
from pmd_pipeline.train.evaluate import evaluate_during_training
from pmd_pipeline.train.export import check_pretrained_codebook
from pmd_pipeline.train.model import build_model
from pmd_pipeline.train.preflight import preflight
from pmd_pipeline.train.sampling import TASKS, task_for_step
from pmd_pipeline.train.tokenizer import prepare_tokenizer, rank0_tokenizer


def train(cfg: TrainConfig, resume: bool = False, say=print) -> Path:
    """Run (or continue) a pretraining run; returns the run folder, which holds log.jsonl and checkpoints."""
    rank, world, device = init_distributed()
    run_dir = Path(cfg.run_dir)
    report = preflight(cfg.data)
    for note in report.notes:
        say(f"note: {note}")
    if cfg.model.pretrained:
        check_pretrained_codebook(cfg.model.pretrained, report.codebook)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(as_dict(cfg), indent=1) + "\n")
        text_tars = report.tars["pairs"] + report.tars["text"]
        tok_dir = prepare_tokenizer(cfg.tokenizer, run_dir, text_tars, cfg.vocab_size, cfg.model.pretrained)
    barrier(world)
    tok_dir = rank0_tokenizer(cfg.tokenizer, run_dir, cfg.model.pretrained) if rank else tok_dir
    _seed_everything(cfg.seed + rank)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True))
    model = build_model(cfg.model, vocab, cfg.data.max_text_len).to(device)
    start, consumed, state = 0, Counter(), None
    if resume:
        path = last_checkpoint(run_dir)
        if path is None:
            raise PmdError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        state = read_checkpoint(path)
        check_codebook(state.get("codebook"), report.codebook, path)
        model.load_state_dict(state["model"])  # the full weights, on every rank, before any sharding
        start, consumed = state["step"], Counter(state["consumed_batches"])
        say(f"resuming {run_dir} at step {start}")
    tasks, optimizer, scheduler, snapshot = prepare_training(model, cfg, device, rank, world, state)
    loaders = _Loaders(cfg, report, str(tok_dir), rank, world, consumed)
    _loop(cfg, tasks, snapshot, optimizer, scheduler, loaders, start, rank, world, device, report, run_dir, say)
    return run_dir


class _Loaders:
    """One lazily started loader per task; each remembers how many batches it handed out."""

    def __init__(self, cfg, report, tok_dir, rank, world, consumed: Counter):
        self.cfg, self.report, self.tok_dir, self.rank, self.world = cfg, report, tok_dir, rank, world
        self.consumed, self.iters = consumed, {}

    def next(self, task: str) -> dict:
        if task not in self.iters:
            d = self.cfg.data
            stream = TaskStream(
                task, self.report.tars[task], self.tok_dir, d.batch_size, d.max_text_len,
                self.cfg.seed, self.rank, self.world, skip_batches=self.consumed[task],
            )  # fmt: skip
            self.iters[task] = make_loader(stream, d.workers)
        batch = next(self.iters[task])
        self.consumed[task] += 1
        return batch


def _loop(cfg, tasks, snapshot, optimizer, scheduler, loaders, start, rank, world, device, report, run_dir, say):
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    mix, failures = Counter(), Counter()
    for step in range(start, cfg.optim.steps):
        task = task_for_step(step, cfg.seed, report.mix)
        t0 = time.perf_counter()
        batch = next_batch_everywhere(loaders, task, world)
        data_wait = time.perf_counter() - t0
        failures.update(batch.pop("failures"))
        losses, loss = train_step(tasks, optimizer, scheduler, task, batch, cfg, device)
        mix[task] += 1
        seconds = time.perf_counter() - t0
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.optim.steps:
            _checkpoint(cfg, run_dir, step + 1, snapshot, scheduler, loaders.consumed, rank, world, report.codebook)
        evaluate_during_training(step + 1, tasks, loaders.tok_dir, cfg, rank, say)
        if rank == 0:
            row = _log_row(step, task, losses, loss, scheduler, cfg, world, data_wait, seconds, mix, failures)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if step % cfg.log_every == 0 or step + 1 == cfg.optim.steps:
                say(_pretty(row))
    if log:
        log.close()


def train_step(tasks, optimizer, scheduler, task: str, batch: dict, cfg: TrainConfig, device):
    """One update on one task's batch; returns the per-task losses and their sum."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with _autocast(cfg, device):
        losses = tasks(task, batch)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    fsdp = is_fsdp(tasks)
    if fsdp:
        drop_unused_grads(tasks)
    optimizer.step()
    scheduler.step()
    if fsdp:  # the forward's clamp went to a gathered copy; this one reaches the stored shard
        tasks.module.clamp_temperature()
    return losses, loss


def _log_row(step, task, losses, loss, scheduler, cfg, world, data_wait, seconds, mix, failures) -> dict:
    done = sum(mix.values())
    return {
        "step": step + 1,
        "task": task,
        "loss": round(loss.item(), 5),
        "losses": {name: round(value.item(), 5) for name, value in losses.items()},
        "lr": scheduler.get_last_lr()[0],
        "samples_per_s": round(cfg.data.batch_size * world / seconds, 2),
        "data_wait_s": round(data_wait, 4),
        "step_s": round(seconds, 4),
        "task_mix": {t: round(mix[t] / done, 3) for t in TASKS},
        "skipped_samples": dict(failures),
    }


def _pretty(row: dict) -> str:
    losses = " ".join(f"{k}={v:.3f}" for k, v in row["losses"].items())
    return f"step {row['step']:>5} {row['task']:<5} {losses}  lr={row['lr']:.2e} {row['samples_per_s']} samples/s"


def _checkpoint(cfg, run_dir, step, snapshot, scheduler, consumed, rank, world, codebook):
    model_state, optimizer_state = snapshot()  # under FSDP a collective: every rank takes part
    rng_states = gather_rng_states(world)
    if rank == 0:
        save_checkpoint(
            run_dir, step, model_state, optimizer_state, scheduler, consumed, rng_states, as_dict(cfg), codebook
        )
    barrier(world)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)  # LayerNorm and softmax stay fp32 under autocast
    return contextlib.nullcontext()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
