"""Checkpoints: model, optimizer, scheduler, step, data position, every RNG and the resolved config: resume is exact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pmd_pipeline.errors import PmdError
from shards.files import atomic_path


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    scheduler,
    consumed: dict[str, int],
    rng_states: list[dict] | None = None,
    config: dict | None = None,
    codebook: str | None = None,
) -> Path:
    """model_state/optimizer_state: whole (unsharded) state dicts; the caller gathers them under FSDP.
    rng_states: every rank's `rng_state()`, in rank order (default: this process's only).
    config: the resolved train config the run was started with (a checkpoint says what made it).
    codebook: the identity of the dVAE codebook whose tokens the shards carry (the MIM targets' meaning)."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    state = {
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "consumed_batches": dict(consumed),  # the data position: batches taken per task
        "rng": rng_states or [rng_state()],  # one per rank: ranks are seeded apart and must stay apart
        "config": config,
        "codebook": codebook,
    }
    with atomic_path(path) as tmp:  # a killed run never leaves a half checkpoint behind
        torch.save(state, tmp)
    return path


def check_codebook(model_codebook: str | None, shards_codebook: str, model: str | Path) -> None:
    """Training on from a model (a checkpoint or a pretrained folder) needs the shards' tokens from the
    codebook its MIM heads learned: another codebook's code 17 means something else. Unknown (None): no check."""
    if model_codebook is not None and shards_codebook and model_codebook != shards_codebook:
        raise PmdError(
            f"{model} was trained on tokens of codebook {model_codebook!r}, but the shards carry codebook "
            f"{shards_codebook!r}: retokenize the shards with its codebook (`pmd tokenize OUT --codebook ... --force`)"
        )


def last_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(states: list[dict] | dict, rank: int = 0) -> None:
    """This rank's saved RNG state (a run resumed on more ranks than saved reuses them round-robin)."""
    states = [states] if isinstance(states, dict) else states  # checkpoints from before per-rank states
    rng = states[rank % len(states)]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
