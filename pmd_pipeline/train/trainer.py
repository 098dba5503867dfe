"""The training loop: one task per step (same on every rank), AdamW + warmup/cosine, JSONL log, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.checkpoint import last_checkpoint, read_checkpoint, restore_rng, rng_state, save_checkpoint
from pmd_pipeline.train.config import TrainConfig, as_dict
from pmd_pipeline.train.data import TaskStream, make_loader
from pmd_pipeline.train.model import FlavaTasks, build_model
from pmd_pipeline.train.preflight import preflight
from pmd_pipeline.train.sampling import TASKS, task_for_step
from pmd_pipeline.train.tokenizer import prepare_tokenizer, rank0_tokenizer


def train(cfg: TrainConfig, resume: bool = False, say=print) -> Path:
    """Run (or continue) a pretraining run; returns the run folder, which holds log.jsonl and checkpoints."""
    rank, world, device = _init_distributed()
    run_dir = Path(cfg.run_dir)
    report = preflight(cfg.data)
    for note in report.notes:
        say(f"note: {note}")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(as_dict(cfg), indent=1) + "\n")
        text_tars = report.tars["pairs"] + report.tars["text"]
        tok_dir = prepare_tokenizer(cfg.tokenizer, run_dir, text_tars, cfg.vocab_size, cfg.model.pretrained)
    _barrier(world)
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
        model.load_state_dict(state["model"])  # the full weights, on every rank, before any sharding
        start, consumed = state["step"], Counter(state["consumed_batches"])
        say(f"resuming {run_dir} at step {start}")
    fsdp = cfg.fsdp and world > 1
    tasks = FlavaTasks(model)
    if fsdp:  # FSDP shards (and reshapes) the parameters: the optimizer is built on what it leaves
        no_decay = _no_decay_names(tasks)
        tasks, scalars = _wrap(tasks, cfg, device, world)
        optimizer, scheduler = make_optimizer(tasks, cfg, no_decay)
        _init_adamw_state(optimizer)
    else:
        optimizer, scheduler = make_optimizer(model, cfg)
        tasks, scalars = _wrap(tasks, cfg, device, world)
    if state is not None:
        saved = state["optimizer"]
        optimizer.load_state_dict(_fsdp_optim_to_load(tasks, optimizer, saved) if fsdp else saved)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], rank)
    snapshot = _fsdp_snapshot(tasks, optimizer, scalars, device) if fsdp else _plain_snapshot(model, optimizer, rank)
    loaders = _Loaders(cfg, report, str(tok_dir), rank, world, consumed)
    _loop(cfg, tasks, snapshot, optimizer, scheduler, loaders, start, rank, world, device, report, run_dir, say)
    return run_dir


def make_optimizer(model, cfg: TrainConfig, no_decay_names: set[str] | None = None):
    """no_decay_names: for a model whose parameters FSDP has flattened (their shapes no longer tell)."""
    o = cfg.optim
    named = [(_clean_name(n), p) for n, p in model.named_parameters()]
    if no_decay_names is None:
        no_decay_names = _no_decay_names(model)
    # No weight decay on biases, LayerNorms and the temperature, as in the paper's recipe.
    decay = [p for n, p in named if n not in no_decay_names]
    no_decay = [p for n, p in named if n in no_decay_names]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, o.warmup_steps, o.steps))
    return optimizer, scheduler


def _init_adamw_state(optimizer) -> None:
    """Give every parameter the state AdamW would create at its first gradient (step 0, zero moments).

    FSDP's optimizer state dict refuses parameters without state, and a task mix leaves some unused for
    a while (some never: the text pooler). AdamW skips parameters without a gradient either way, and
    finds exactly this state when it would otherwise create it, so the updates are unchanged.
    """
    for group in optimizer.param_groups:
        assert not (group["amsgrad"] or group["fused"] or group["capturable"]), "state layout assumed below"
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _no_decay_names(model) -> set[str]:
    return {_clean_name(n) for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n}


def _clean_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
        batch = _next_batch_everywhere(loaders, task, world)
        data_wait = time.perf_counter() - t0
        failures.update(batch.pop("failures"))
        losses, loss = train_step(tasks, optimizer, scheduler, task, batch, cfg, device)
        mix[task] += 1
        seconds = time.perf_counter() - t0
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.optim.steps:
            _checkpoint(run_dir, step + 1, snapshot, scheduler, loaders.consumed, rank, world)
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
    fsdp = _is_fsdp(tasks)
    if fsdp:
        _drop_unused_grads(tasks)
    optimizer.step()
    scheduler.step()
    if fsdp:  # the forward's clamp went to a gathered copy; this one reaches the stored shard
        tasks.module.clamp_temperature()
    return losses, loss


def _drop_unused_grads(tasks) -> None:
    """Give the parameters this step's task did not use no gradient (None), as DDP and one process do.

    FSDP computes one flat gradient, so every parameter gets one: zeros where unused. AdamW would then
    move those parameters anyway (momentum, weight decay, its step count): a text step would change
    the image head. A parameter counts as used when its gradient is non-zero on some rank (each rank
    holds a shard of it); one small all-reduce per step.
    """
    params = [p for p in tasks.parameters() if p.requires_grad]
    device = params[0].device
    none = torch.zeros((), dtype=torch.bool, device=device)
    used = torch.stack([p.grad.ne(0).any() if p.grad is not None and p.grad.numel() else none for p in params])
    used = used.to(torch.int32)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    for param, flag in zip(params, used.tolist(), strict=True):
        if not flag:
            param.grad = None


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


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


def _next_batch_everywhere(loaders, task: str, world: int) -> dict:
    """Every rank learns whether every other rank got its batch, so one failing rank stops all, never hangs."""
    error = None
    try:
        batch = loaders.next(task)
    except (StopIteration, PmdError, RuntimeError) as err:
        batch, error = None, err
    if world > 1:
        ok = torch.tensor([0 if error else 1], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 0 and error is None:
            raise PmdError(f"another rank could not read a '{task}' batch; stopping this rank too")
    if error is not None:
        raise PmdError(f"could not read a '{task}' batch: {error}") from None
    return batch


def _checkpoint(run_dir, step, snapshot, scheduler, consumed, rank, world):
    model_state, optimizer_state = snapshot()  # under FSDP a collective: every rank takes part
    rng_states = [rng_state()]
    if world > 1:
        rng_states = [None] * world
        dist.all_gather_object(rng_states, rng_state())
    if rank == 0:
        save_checkpoint(run_dir, step, model_state, optimizer_state, scheduler, consumed, rng_states)
    _barrier(world)


def _plain_snapshot(model, optimizer, rank: int):
    """Single process or DDP: every rank holds the whole model; rank 0 saves it."""
    return lambda: (model.state_dict(), optimizer.state_dict()) if rank == 0 else (None, None)


def _fsdp_snapshot(tasks, optimizer, scalars: set[str], device: torch.device):
    """FSDP: full (unsharded) model and optimizer state, gathered on rank 0 (CPU); other ranks get empty dicts.

    The model state has the plain model's keys and shapes, so it loads into an unwrapped model (as resume
    does, before sharding); the optimizer state is FSDP's full one, keyed by parameter name.
    offload_to_cpu only off the CPU: on a CPU device (gloo) FSDP's "offload" is a no-op move followed by
    freeing the gathered parameters, so the state dict would read freed memory (a segfault in torch 2.13).
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = device.type != "cpu"

    def snapshot():
        with FSDP.state_dict_type(
            tasks,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        ):
            full = tasks.state_dict()
            optimizer_state = FSDP.optim_state_dict(tasks, optimizer)
        prefix = "model."  # FlavaTasks holds the model as .model
        model_state = {k.removeprefix(prefix): v.reshape(()) if k in scalars else v for k, v in full.items()}
        return model_state, optimizer_state

    return snapshot


def _fsdp_optim_to_load(tasks, optimizer, full_state: dict) -> dict:
    """Every rank read the whole checkpoint: each keeps its own shard of the optimizer state."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        tasks,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(rank0_only=False),
        FullOptimStateDictConfig(rank0_only=False),
    ):
        return FSDP.optim_state_dict_to_load(tasks, optimizer, full_state)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)  # LayerNorm and softmax stay fp32 under autocast
    return contextlib.nullcontext()


def _wrap(tasks, cfg: TrainConfig, device, world: int):
    """The module to train and the names of the 0-d parameters it made 1-d (FSDP only)."""
    if world == 1:
        return tasks, set()
    if cfg.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        scalars = _scalars_to_1d(tasks)  # FSDP refuses 0-d parameters (FLAVA's logit_scale is one)
        # device_id: without it FSDP wants an accelerator; on CPU (gloo) it runs on the CPU device handle.
        _broadcast_from_rank0(tasks)
        return FullyShardedDataParallel(tasks, use_orig_params=True, device_id=device), scalars
    from torch.nn.parallel import DistributedDataParallel

    # Each step uses one task's parameters only, so DDP must tolerate unused ones.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(tasks, device_ids=ids, find_unused_parameters=True), set()


def _broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights (ranks seed differently), as DDP does when it wraps.

    FSDP's own sync_module_states=True refuses CPU parameters, so gloo runs could not use it.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def _scalars_to_1d(module: torch.nn.Module) -> set[str]:
    names = set()
    for name, param in list(module.named_parameters()):
        if param.ndim == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            setattr(owner, attr, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.add(name)
    return names


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
