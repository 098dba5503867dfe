"""AdamW with the paper's parameter groups and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

from pmd_pipeline.train.config import TrainConfig


def make_optimizer(model, cfg: TrainConfig, without_decay: set[str] | None = None):
    """without_decay: names for a model whose parameters FSDP has flattened (their shapes no longer tell)."""
    o = cfg.optim
    named = [(clean_name(n), p) for n, p in model.named_parameters()]
    if without_decay is None:
        without_decay = no_decay_names(model)
    # No weight decay on biases, LayerNorms and the temperature, as in the paper's recipe.
    decay = [p for n, p in named if n not in without_decay]
    no_decay = [p for n, p in named if n in without_decay]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, o.warmup_steps, o.steps))
    return optimizer, scheduler


def no_decay_names(model) -> set[str]:
    return {clean_name(n) for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n}


def clean_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
