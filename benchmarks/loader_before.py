"""The trainer's loader before issue 16 (commit 6f0841b), kept as the baseline of `bench_train`'s loader
figures: shards in a fixed order per stream, each stream counting its own epochs, the first caption only,
ITM negatives from the neighbouring batch, and resume by decoding every skipped batch again."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pmd_pipeline.train.data import TASK_IDS, PackedBatch, _Tokenizer, decode_sample
from pmd_pipeline.train.masking import block_mask, mlm_mask
from shards.tar import shard_samples

ITM_NEGATIVE_RATE = 0.5


class OldTaskStream(IterableDataset):
    def __init__(self, task, tars, tokenizer_dir, batch_size, max_text_len, seed, rank, world, skip_batches=0):
        super().__init__()
        self.task, self.tars, self.tokenizer_dir = task, list(tars), tokenizer_dir
        self.batch_size, self.max_text_len, self.seed = batch_size, max_text_len, seed
        self.rank, self.world, self.skip_batches = rank, world, skip_batches
        self._tokenizer = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (worker + self.skip_batches) % workers
        stream = self.rank * workers + logical
        mine = len(range(logical, self.skip_batches, workers))
        batches = _with_neighbours(self._decoded_batches(stream, self.world * workers))
        for index, (previous, batch, following) in enumerate(batches):
            if index < mine:
                continue
            rng = np.random.default_rng([self.seed, TASK_IDS[self.task], stream, index])
            pool = [s["text"] for s in (previous or following or []) if "text" in s]
            packed = self._collate(batch[0], batch[1], pool, rng, shared=info is not None)
            yield packed if info else packed.unpack()

    def _raw_samples(self, stream: int, streams: int) -> Iterator[dict]:
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, TASK_IDS[self.task], epoch]).permutation(len(self.tars))
            tars = [self.tars[i] for i in order]
            by_shard = len(tars) >= streams
            source = tars[stream::streams] if by_shard else tars
            for position, sample in enumerate(shard_samples(source)):
                if by_shard or position % streams == stream:
                    yield sample

    def _decoded_batches(self, stream: int, streams: int):
        batch, failures = [], Counter()
        for raw in self._raw_samples(stream, streams):
            if "json" in raw and "txt" in raw:
                raw = {k: v for k, v in raw.items() if k != "json"}  # the first caption only, as before
            sample, reason = decode_sample(raw, self.task)
            if reason:
                failures[reason] += 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch, failures
                batch, failures = [], Counter()

    def _collate(self, samples, failures, pool, rng, shared: bool = False) -> PackedBatch:
        arrays: dict[str, np.ndarray] = {}
        if self.task in ("pairs", "image"):
            arrays["bool_masked_pos"] = np.stack([block_mask(rng).reshape(-1) for _ in samples])
            arrays["mim_labels"] = np.stack([s["tokens"].reshape(-1) for s in samples]).astype(np.int64)
        if self.task in ("pairs", "text"):
            texts = [s["text"] for s in samples]
            if self.task == "pairs":
                texts, arrays["itm_labels"] = _itm_negatives(texts, pool, rng)
            if self._tokenizer is None:
                self._tokenizer = _Tokenizer(self.tokenizer_dir, self.max_text_len)
            tok = self._tokenizer
            ids, attention = tok.encode(texts)
            special = np.isin(ids, tok.special_ids)
            masked, labels = zip(*(mlm_mask(r, sp, rng, tok.mask_id, tok.vocab) for r, sp in zip(ids, special)))  # noqa: B905
            arrays |= {"input_ids": ids, "input_ids_masked": np.stack(masked), "mlm_labels": np.stack(labels),
                       "attention_mask": attention}  # fmt: skip
        pixels = [s["pixels"] for s in samples] if self.task in ("pairs", "image") else None
        return PackedBatch.build(arrays, pixels, {"failures": dict(failures)}, shared)


def _itm_negatives(texts, pool, rng):
    texts, labels = list(texts), np.ones(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        others = [p for p in pool if p != text]
        if others and rng.random() < ITM_NEGATIVE_RATE:
            texts[i], labels[i] = others[rng.integers(len(others))], 0
    return texts, labels


def _with_neighbours(items):
    previous, current = None, next(items)
    for following in items:
        yield previous and previous[0], current, following[0]
        previous, current = current, following
