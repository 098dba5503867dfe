"""The training loop: one task per step (same on every rank), accumulated micro-batches, AdamW + warmup/cosine,
metrics (metrics.py), checkpoints, and the refusals that keep a run folder one run."""

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
from pmd_pipeline.train.config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    accumulation,
    as_dict,
    changed_on_resume,
    flat_config,
)
from pmd_pipeline.train.data import make_loader, task_stream
from pmd_pipeline.train.distributed import (
    barrier,
    drop_unused_grads,
    gather_rng_states,
    grad_norm,
    init_distributed,
    is_fsdp,
    mean_over_ranks,
    next_batch_everywhere,
    no_sync_unless,
    prepare_training,
)
from pmd_pipeline.train.evaluate import evaluate_during_training
from pmd_pipeline.train.export import check_pretrained_codebook
from pmd_pipeline.train.metrics import TENSORBOARD, RunLog, check_metrics
from pmd_pipeline.train.model import CachedFeatures, build_model, loss_counts
from pmd_pipeline.train.preflight import preflight
from pmd_pipeline.train.sampling import TASKS, task_for_step
from pmd_pipeline.train.tokenizer import prepare_tokenizer, rank0_tokenizer


def train(cfg: TrainConfig, resume: bool = False, say=print) -> Path:
    """Run (or continue) a pretraining run; returns the run folder, which holds log.jsonl and checkpoints."""
    rank, world, device = init_distributed()
    run_dir = Path(cfg.run_dir)
    accum = accumulation(cfg, world)  # the config's mistakes are found before anything is written
    check_metrics(cfg)
    state = _resume_state(run_dir, cfg) if resume else _refuse_a_used_folder(run_dir)
    report = preflight(cfg.data)
    for note in report.notes:
        say(f"note: {note}")
    if state is not None:  # the shards a run resumes on were made with the codebook it was trained on
        check_codebook(state.get("codebook"), report.codebook, last_checkpoint(run_dir))
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
    model = build_model(cfg.model, vocab, max(cfg.data.pair_text_len, cfg.data.text_len)).to(device)
    start, consumed = 0, Counter()
    if state is not None:
        model.load_state_dict(state["model"])  # the full weights, on every rank, before any sharding
        start, consumed = state["step"], Counter(state["consumed_batches"])
        say(f"resuming {run_dir} at step {start}")
    if accum > 1:
        batch = f"{cfg.data.batch_size} per rank x {world} ranks x {accum} accumulated"
        say(f"global batch {cfg.optim.global_batch} = {batch}")
    tasks, optimizer, scheduler, snapshot = prepare_training(model, cfg, device, rank, world, state)
    loaders = _Loaders(cfg, report, str(tok_dir), rank, world, consumed)
    log = RunLog(run_dir, cfg, start) if rank == 0 else None
    try:
        _loop(cfg, tasks, snapshot, optimizer, scheduler, loaders, start, accum, world, device, report, log, say)
    finally:  # a run stopped by an error keeps the metrics of the steps it did
        png = log.close() if log else None
    if png:
        say(f"done: {cfg.optim.steps} steps; checkpoint {last_checkpoint(run_dir)}; loss curves {png}"
            + (f"; tensorboard --logdir {run_dir / TENSORBOARD}" if cfg.metrics.tensorboard else ""))  # fmt: skip
    return run_dir


def _refuse_a_used_folder(run_dir: Path) -> None:
    """A fresh run never trains over another run's checkpoints (it would overwrite them from step 1)."""
    existing = last_checkpoint(run_dir)
    if existing is not None:
        raise PmdError(
            f"{run_dir} already holds checkpoints (last: {existing.name}): use --resume to continue that run, "
            "or a new run folder (run_dir in the config, or --run-dir) for a new one"
        )


def _resume_state(run_dir: Path, cfg: TrainConfig) -> dict:
    """The last checkpoint's state, if this config trains what it was trained with (RESUMABLE_CHANGES aside)."""
    path = last_checkpoint(run_dir)
    if path is None:
        raise PmdError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    state = read_checkpoint(path)
    if state.get("config"):  # checkpoints from before configs were saved cannot be checked
        changed = changed_on_resume(state["config"], as_dict(cfg))
        if changed:
            saved, now = flat_config(state["config"]), flat_config(as_dict(cfg))
            details = ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in changed)
            raise PmdError(
                f"--resume with a config that changes what {run_dir} trains: {details}. Only "
                f"{', '.join(RESUMABLE_CHANGES)} may change on resume; start a new run folder for the rest"
            )
    return state


class _Loaders:
    """One lazily started loader per task; each remembers how many batches it handed out."""

    def __init__(self, cfg, report, tok_dir, rank, world, consumed: Counter):
        self.cfg, self.report, self.tok_dir, self.rank, self.world = cfg, report, tok_dir, rank, world
        self.consumed, self.iters = consumed, {}

    def next(self, task: str) -> dict:
        if task not in self.iters:
            d, skip = self.cfg.data, self.consumed[task]
            stream = task_stream(d, task, self.report, self.tok_dir, self.cfg.seed, self.rank, self.world, skip)
            self.iters[task] = make_loader(stream, d.workers)
        batch = next(self.iters[task])
        self.consumed[task] += 1
        return batch


def _loop(cfg, tasks, snapshot, optimizer, scheduler, loaders, start, accum, world, device, report, log, say):
    rank, run_dir = loaders.rank, Path(cfg.run_dir)
    mix, failures = Counter(), Counter()
    for step in range(start, cfg.optim.steps):
        task = task_for_step(step, cfg.seed, report.mix)
        t0 = time.perf_counter()
        micro = [next_batch_everywhere(loaders, task, world) for _ in range(accum)]
        data_wait = time.perf_counter() - t0
        for batch in micro:
            failures.update(batch.pop("failures"))
        losses, lr, norm = train_step(tasks, optimizer, scheduler, task, micro, cfg, device)
        losses = mean_over_ranks(losses, world)  # a collective: every rank takes part, rank 0 logs
        mix[task] += 1
        seconds = time.perf_counter() - t0
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.optim.steps:
            _checkpoint(cfg, run_dir, step + 1, snapshot, scheduler, loaders.consumed, rank, world, report.codebook)
        evaluate_during_training(step + 1, tasks, loaders.tok_dir, cfg, rank, say)
        if log:
            samples = cfg.data.batch_size * world * accum
            row = _log_row(step, task, losses, lr, norm, samples, data_wait, seconds, mix, failures)
            log.write(row)
            if step % cfg.log_every == 0 or step + 1 == cfg.optim.steps:
                say(log.progress(row))


def train_step(tasks, optimizer, scheduler, task: str, micro: list[dict], cfg: TrainConfig, device):
    """One update on a step's micro-batches of one task; returns the step's losses (those of one batch of all
    its micro-batches), the lr this update used and the gradient norm."""
    micro = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in micro]
    optimizer.zero_grad(set_to_none=True)
    losses = accumulate_gradients(tasks, task, micro, cfg, device)
    fsdp = is_fsdp(tasks)
    if fsdp:
        drop_unused_grads(tasks)
    norm = grad_norm(tasks)
    lr = scheduler.get_last_lr()[0]  # the lr of this update: scheduler.step() below sets the next step's
    optimizer.step()
    scheduler.step()
    if fsdp:  # the forward's clamp went to a gathered copy; this one reaches the stored shard
        tasks.module.clamp_temperature()
    return losses, lr, norm


def accumulate_gradients(tasks, task: str, micro: list[dict], cfg: TrainConfig, device) -> dict[str, torch.Tensor]:
    """Forward and backward over the micro-batches, leaving the gradients of one batch made of all of them.

    Each loss that is a mean over items (MLM/MMM-text tokens, MIM/MMM-image patches, ITM rows) is weighted by
    the micro-batch's share of the step's items, so the sum is the mean over the whole batch. The contrastive
    loss is the whole accumulated batch's, with every micro-batch's negatives (CachedFeatures): each pass
    computes it in full and its gradient flows through the live micro-batch only, so it counts once per pass.
    """
    matched = task != "pairs" or any(bool(batch["itm_labels"].any()) for batch in micro)
    counts = [loss_counts(task, batch, matched) for batch in micro]
    totals = {name: sum(c[name] for c in counts) for name in counts[0]}
    cached = _cached_features(tasks, micro, cfg, device) if task == "pairs" and len(micro) > 1 else None
    step_losses: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro):
        weights = {name: counts[index][name] / max(1, totals[name]) for name in totals}
        weights["contrastive"] = 1.0
        with no_sync_unless(tasks, last=index == len(micro) - 1):
            with _autocast(cfg, device):
                if cached:
                    cached.live = index
                losses = tasks(task, batch, cached) if cached else tasks(task, batch)
            sum(losses[name] * weights[name] for name in losses).backward()
        for name, value in losses.items():
            share = 1 / len(micro) if name == "contrastive" else weights[name]  # the same full loss in every pass
            step_losses[name] = step_losses.get(name, 0.0) + value.detach() * share
    return step_losses


def _cached_features(tasks, micro: list[dict], cfg: TrainConfig, device) -> CachedFeatures:
    with torch.no_grad(), _autocast(cfg, device):
        features = [tasks("features", batch) for batch in micro]
    positives = [batch["itm_labels"].bool() for batch in micro]
    return CachedFeatures([f["image"] for f in features], [f["text"] for f in features], positives)


def _log_row(step, task, losses, lr, norm, samples, data_wait, seconds, mix, failures) -> dict:
    done = sum(mix.values())
    return {
        "step": step + 1,
        "task": task,
        "loss": round(sum(losses.values()), 5),
        "losses": {name: round(value, 5) for name, value in losses.items()},
        "lr": lr,
        "grad_norm": round(norm, 5),
        "samples_per_s": round(samples / seconds, 2),
        "data_wait_s": round(data_wait, 4),
        "step_s": round(seconds, 4),
        "task_mix": {t: round(mix[t] / done, 3) for t in TASKS},
        "skipped_samples": dict(failures),
    }


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
