"""Distributed plumbing of the trainer: process groups, DDP/FSDP wrapping, gathered checkpoints, FSDP's quirks.

One process (no torchrun) runs the same loop with all of this reduced to no-ops.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.checkpoint import restore_rng, rng_state
from pmd_pipeline.train.config import TrainConfig
from pmd_pipeline.train.model import FlavaTasks
from pmd_pipeline.train.optim import make_optimizer, no_decay_names


def prepare_training(model, cfg: TrainConfig, device: torch.device, rank: int, world: int, state: dict | None):
    """The module to train (wrapped for DDP/FSDP), its optimizer and scheduler restored from `state`, and the
    function that takes a checkpoint's full state."""
    fsdp = cfg.fsdp and world > 1
    tasks = FlavaTasks(model)
    if fsdp:  # FSDP shards (and reshapes) the parameters: the optimizer is built on what it leaves
        no_decay = no_decay_names(tasks)
        tasks, scalars = wrap(tasks, cfg, device, world)
        optimizer, scheduler = make_optimizer(tasks, cfg, no_decay)
        init_adamw_state(optimizer)
    else:
        optimizer, scheduler = make_optimizer(model, cfg)
        tasks, scalars = wrap(tasks, cfg, device, world)
    if state is not None:
        saved = state["optimizer"]
        optimizer.load_state_dict(fsdp_optim_to_load(tasks, optimizer, saved) if fsdp else saved)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], rank)
    snapshot = fsdp_snapshot(tasks, optimizer, scalars, device) if fsdp else plain_snapshot(model, optimizer, rank)
    return tasks, optimizer, scheduler, snapshot


def gather_rng_states(world: int) -> list[dict]:
    """Every rank's RNG state in rank order (ranks are seeded apart and must stay apart after a resume)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def init_adamw_state(optimizer) -> None:
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


def drop_unused_grads(tasks) -> None:
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


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def next_batch_everywhere(loaders, task: str, world: int) -> dict:
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


def plain_snapshot(model, optimizer, rank: int):
    """Single process or DDP: every rank holds the whole model; rank 0 saves it."""
    return lambda: (model.state_dict(), optimizer.state_dict()) if rank == 0 else (None, None)


def fsdp_snapshot(tasks, optimizer, scalars: set[str], device: torch.device):
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


def fsdp_optim_to_load(tasks, optimizer, full_state: dict) -> dict:
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


def wrap(tasks, cfg: TrainConfig, device, world: int):
    """The module to train and the names of the 0-d parameters it made 1-d (FSDP only)."""
    if world == 1:
        return tasks, set()
    if cfg.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        scalars = _scalars_to_1d(tasks)  # FSDP refuses 0-d parameters (FLAVA's logit_scale is one)
        # device_id: without it FSDP wants an accelerator; on CPU (gloo) it runs on the CPU device handle.
        _broadcast_from_rank0(tasks)
        return FullyShardedDataParallel(
            tasks, use_orig_params=True, device_id=device, **fsdp_options(cfg, device)
        ), scalars
    from torch.nn.parallel import DistributedDataParallel

    # Each step uses one task's parameters only, so DDP must tolerate unused ones.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(tasks, device_ids=ids, find_unused_parameters=True), set()


def fsdp_options(cfg: TrainConfig, device: torch.device) -> dict:
    """One FSDP unit per transformer layer (each FlavaLayer's parameters are gathered only while it runs, so a
    rank holds one layer in full at a time), the rest in the root unit; and, with bf16 on a GPU, the paper's
    mixed precision: bf16 parameters in the forward/backward and bf16 gradient reduction, fp32 shards for the
    optimizer, LayerNorms in fp32 (FSDP wraps them apart, without mixed precision). On CPU (gloo) no mixed
    precision: full fp32, as autocast is off there too."""
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.flava.modeling_flava import FlavaLayer

    mixed = None
    if cfg.bf16 and device.type == "cuda":
        mixed = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, _module_classes_to_ignore=(torch.nn.LayerNorm,)
        )
    return {"auto_wrap_policy": ModuleWrapPolicy({FlavaLayer}), "mixed_precision": mixed}


def no_sync_unless(tasks, last: bool):
    """DDP/FSDP: gradients are reduced over the ranks at the last micro-batch of a step only."""
    return contextlib.nullcontext() if last or not hasattr(tasks, "no_sync") else tasks.no_sync()


def grad_norm(tasks) -> float:
    """The L2 norm of the whole gradient (under FSDP each rank holds a shard of it: their squares are summed)."""
    grads = [p.grad for p in tasks.parameters() if p.grad is not None]
    if not is_fsdp(tasks):
        return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    squares = torch.zeros((), dtype=torch.float64, device=next(tasks.parameters()).device)
    for grad in grads:
        squares += grad.double().pow(2).sum()
    dist.all_reduce(squares)
    return squares.sqrt().item()


def mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The losses every rank computed on its own batch, averaged: what the step's whole batch scored."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float() for n in names])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(names, stacked.tolist(), strict=True))


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


def init_distributed() -> tuple[int, int, torch.device]:
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


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
