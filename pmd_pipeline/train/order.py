"""Which raw sample a data stream reads when: pure arithmetic on the shards' sample counts.

An epoch is global: its shards are permuted (seed, task, epoch) and laid end to end as one cycle of
positions, read from a seeded starting point; stream s of S takes the s-th equal slice of it, so every
stream holds the same number of whole batches and all of them move to the next epoch together. A stream
reads its slice in `lanes` contiguous parts round-robin (several shards in flight at once), then hands out
each window of `window` raw samples in a seeded random order. Everything here is a function of counts and
seeds: a resumed stream computes where it stands without reading what came before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmd_pipeline.errors import PmdError


def samples_per_stream(total: int, streams: int, batch_size: int, task: str) -> int:
    """Whole batches only: the tail of an epoch's sequence that cannot fill a batch on every stream
    (fewer than streams x batch_size samples) is left out of that epoch. A task with fewer samples than
    one batch per stream repeats its cycle within the epoch until each stream has one."""
    if total <= 0:
        raise PmdError(f"task '{task}': its shards hold no samples")
    cycles = -(-streams * batch_size // total)
    return cycles * total // (streams * batch_size) * batch_size


@dataclass(frozen=True)
class EpochPlan:
    shards: np.ndarray  # shard indices in this epoch's order, the cycle repeated as far as the slices reach
    starts: np.ndarray  # global position of each ordered shard's first sample; one more entry: the end
    lane_starts: np.ndarray  # global position where each lane of this stream begins
    lane_of: np.ndarray  # for the stream's i-th raw sample: its lane
    position: np.ndarray  # for the stream's i-th raw sample: its global position

    def shard_at(self, position: int) -> int:
        """Index into `shards` of the shard holding a global position."""
        return int(np.searchsorted(self.starts, position, side="right")) - 1


def epoch_plan(counts, epoch, stream, streams, per, lanes, seed, task_id) -> EpochPlan:
    rng = np.random.default_rng([seed, task_id, epoch])
    shards = rng.permutation(len(counts))
    # The epoch's sequence starts at a seeded position of the shard cycle, laid out as often as the slices
    # reach (no slice wraps): the tail left out moves every epoch, also with a single shard.
    total = int(np.sum(counts))
    shards = np.tile(shards, 1 + -(-streams * per // total))
    starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64)[shards])])
    offset = int(rng.integers(total))
    lanes = max(1, min(lanes, per))
    bounds = offset + stream * per + np.arange(lanes + 1) * per // lanes
    sizes = np.diff(bounds)
    lane = np.repeat(np.arange(lanes), sizes)
    step = np.concatenate([np.arange(size) for size in sizes])
    order = np.lexsort((lane, step))  # round-robin: the first sample of every lane, then the second, ...
    return EpochPlan(shards, starts, bounds[:-1], lane[order], bounds[:-1][lane[order]] + step[order])


def window_size(shuffle_buffer: int, batch_size: int) -> int:
    """The shuffle window, rounded up to whole batches (0 or less: one batch, read in order)."""
    return max(1, -(-shuffle_buffer // batch_size)) * batch_size


def window_order(size: int, shuffled: bool, seed: int, task_id: int, epoch: int, stream: int, start: int):
    if not shuffled:
        return np.arange(size)
    return np.random.default_rng([seed, task_id, epoch, stream, start]).permutation(size)
