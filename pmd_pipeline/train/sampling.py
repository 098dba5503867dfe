"""Per-step dataset choice: a pure function of (seed, step), so every rank picks the same task."""

from __future__ import annotations

import numpy as np

TASKS = ("pairs", "image", "text")


def task_for_step(step: int, seed: int, mix: dict[str, float]) -> str:
    """No communication needed: each rank seeds the same generator with (seed, step)."""
    weights = np.array([mix.get(task, 0.0) for task in TASKS], dtype=float)
    u = np.random.default_rng([seed, step, 7]).random()
    index = int(np.searchsorted(np.cumsum(weights / weights.sum()), u, side="right"))
    return TASKS[min(index, len(TASKS) - 1)]
