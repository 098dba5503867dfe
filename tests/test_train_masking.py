"""Masking (BEiT blocks, 15% MLM) and per-step task sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pmd_pipeline.train.masking import MASKED_PATCHES, block_mask, mlm_mask
from pmd_pipeline.train.sampling import TASKS, task_for_step


def test_block_mask_masks_75_patches_in_blocks():
    rng = np.random.default_rng(0)
    masks = [block_mask(rng) for _ in range(300)]
    counts = np.array([m.sum() for m in masks])
    assert all(m.shape == (14, 14) for m in masks)
    assert (counts == MASKED_PATCHES).all()
    # Blocks, not scattered patches: most masked patches have 2+ masked neighbours (random masking: ~45%).
    assert np.mean([_clustered(m) for m in masks]) > 0.8
    assert _clustered(np.random.default_rng(0).permutation(196).reshape(14, 14) < 75) < 0.6


def _clustered(mask: np.ndarray) -> float:
    padded = np.pad(mask, 1).astype(int)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return float((neighbours[mask] >= 2).mean())


def _beit_block_mask(rng: np.random.Generator) -> np.ndarray:
    """The straightforward version (rng.uniform per draw): the fast one must give the same masks and draws."""
    import math

    from pmd_pipeline.train.masking import ASPECT, GRID, MIN_BLOCK, _grow_edges

    mask, count = np.zeros((GRID, GRID), dtype=bool), 0
    while count < MASKED_PATCHES:
        budget, added = MASKED_PATCHES - count, 0
        for _ in range(10):
            area = rng.uniform(MIN_BLOCK, max(MIN_BLOCK, budget))
            aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h >= GRID or w >= GRID:
                continue
            top, left = rng.integers(0, GRID - h + 1), rng.integers(0, GRID - w + 1)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[:] = True
                added = new
                break
        if added == 0:
            _grow_edges(mask, rng, budget)
            break
        count += added
    return mask


def test_block_mask_equals_the_plain_beit_loop_draw_for_draw():
    for seed in range(300):
        fast, plain = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        for _ in range(8):
            assert (block_mask(fast) == _beit_block_mask(plain)).all(), seed
        assert fast.random() == plain.random()  # the generators are left in the same state


def test_block_mask_is_reproducible_and_varies():
    a = block_mask(np.random.default_rng([1, 2]))
    assert (a == block_mask(np.random.default_rng([1, 2]))).all()
    assert not (a == block_mask(np.random.default_rng([1, 3]))).all()


def test_mlm_mask_targets_15_percent_of_real_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=(2000, 32))
    special = np.zeros_like(ids, dtype=bool)
    special[:, 0] = special[:, -5:] = True  # [CLS] and padding are never targets
    results = [mlm_mask(row, sp, rng, mask_id=4, vocab=1000) for row, sp in zip(ids, special, strict=True)]
    masked = np.stack([r[0] for r in results])
    labels = np.stack([r[1] for r in results])
    chosen = labels != -100
    assert not chosen[special].any()
    assert abs(chosen[~special].mean() - 0.15) < 0.01
    assert (labels[chosen] == ids[chosen]).all()
    assert abs((masked[chosen] == 4).mean() - 0.8) < 0.03
    assert (masked[~chosen] == ids[~chosen]).all()


def test_mlm_mask_always_has_a_target():
    rng = np.random.default_rng(0)
    ids = np.array([2, 50, 3, 0, 0])
    special = np.array([True, False, True, True, True])
    for _ in range(50):
        _, labels = mlm_mask(ids, special, rng, mask_id=4, vocab=100)
        assert (labels != -100).sum() == 1 and labels[1] == 50


def test_task_sampling_is_a_pure_function_of_seed_and_step():
    mix = {"pairs": 0.7, "image": 0.15, "text": 0.15}
    first = [task_for_step(s, 0, mix) for s in range(4000)]
    assert first == [task_for_step(s, 0, mix) for s in range(4000)]
    assert first != [task_for_step(s, 1, mix) for s in range(4000)]
    realised = Counter(first)
    for task in TASKS:
        assert abs(realised[task] / 4000 - mix[task]) < 0.03


def test_task_sampling_never_picks_a_zero_weight_task():
    tasks = {task_for_step(s, 0, {"pairs": 0.5, "image": 0.0, "text": 0.5}) for s in range(2000)}
    assert tasks == {"pairs", "text"}
