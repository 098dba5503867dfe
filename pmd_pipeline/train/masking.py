"""BEiT block masking of the 14x14 patch grid and BERT-style 15% MLM masking (run in data workers)."""

from __future__ import annotations

import math

import numpy as np

GRID = 14
MASKED_PATCHES = 75
MIN_BLOCK = 16
ASPECT = (0.3, 1 / 0.3)
_LOG_ASPECT_LOW = math.log(ASPECT[0])
_LOG_ASPECT_SPAN = math.log(ASPECT[1]) - _LOG_ASPECT_LOW


def block_mask(rng: np.random.Generator, grid: int = GRID, patches: int = MASKED_PATCHES) -> np.ndarray:
    """BEiT's generator: add random rectangles (area >= 16, aspect 0.3-3.3) until `patches` are masked."""
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < patches:
        added = _add_block(mask, rng, patches - count)
        if added == 0:  # no rectangle fits the small remaining budget: grow the blocks' edges instead
            _grow_edges(mask, rng, patches - count)
            break
        count += added
    return mask


def _grow_edges(mask: np.ndarray, rng: np.random.Generator, missing: int) -> None:
    """Top up to exactly `patches` with unmasked neighbours of masked patches (BEiT would stop short)."""
    for _ in range(missing):
        near = np.zeros_like(mask)
        near[1:] |= mask[:-1]
        near[:-1] |= mask[1:]
        near[:, 1:] |= mask[:, :-1]
        near[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(near & ~mask)
        mask.flat[rng.choice(candidates)] = True


def _add_block(mask: np.ndarray, rng: np.random.Generator, budget: int) -> int:
    # Same draws, in the same order, as BEiT's rng.uniform(...) pair: uniform(a, b) is a + (b - a) * random(),
    # so one random(2) call gives bit-identical values at a third of the per-call cost (the hot loop here).
    grid = mask.shape[0]
    span = max(MIN_BLOCK, budget) - MIN_BLOCK
    for _ in range(10):
        u_area, u_aspect = rng.random(2).tolist()
        area = MIN_BLOCK + span * u_area
        aspect = math.exp(_LOG_ASPECT_LOW + _LOG_ASPECT_SPAN * u_aspect)
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h >= grid or w >= grid:
            continue
        top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        window = mask[top : top + h, left : left + w]
        new = h * w - np.count_nonzero(window)
        if 0 < new <= budget:
            window[:] = True
            return new
    return 0


def mlm_mask(
    ids: np.ndarray, special: np.ndarray, rng: np.random.Generator, mask_id: int, vocab: int, rate: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """15% of the real tokens become targets (80% [MASK], 10% random, 10% kept); labels -100 elsewhere."""
    candidates = ~special
    chosen = candidates & (rng.random(ids.shape) < rate)
    if candidates.any() and not chosen.any():  # at least one target, so the loss is never empty
        chosen[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(chosen, ids, -100)
    masked = ids.copy()
    roll = rng.random(ids.shape)
    masked[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = rng.integers(0, vocab, int(swap.sum()))
    return masked, labels
