"""Stream shards into batches: decode, mask and tokenize in DataLoader workers; resumable by batch count.

Each (rank, worker) pair reads its own deterministic stream, an endless chain of epochs, and builds
whole batches. The DataLoader hands batches out round-robin over its workers, so after `n` batches of a
task every worker knows how many of its own batches were used: resume skips exactly those.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.masking import block_mask, mlm_mask

# No crop or flip: the dVAE tokens describe exactly the stored 224x224 pixels.
IMAGE_SIZE = 224
TASK_IDS = {"pairs": 0, "image": 1, "text": 2}
ITM_NEGATIVE_RATE = 0.5


class TaskStream(IterableDataset):
    """Endless batches of one task ('pairs', 'image' or 'text') for one rank."""

    def __init__(self, task, tars, tokenizer_dir, batch_size, max_text_len, seed, rank, world, skip_batches=0):
        super().__init__()
        self.task, self.tars, self.tokenizer_dir = task, list(tars), tokenizer_dir
        self.batch_size, self.max_text_len, self.seed = batch_size, max_text_len, seed
        self.rank, self.world, self.skip_batches = rank, world, skip_batches
        self._tokenizer = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A fresh DataLoader starts its round-robin at worker 0, but batch `skip_batches` belongs to
        # stream skip_batches % workers: rotate the roles so the resumed order equals the original one.
        logical = (worker + self.skip_batches) % workers
        stream = self.rank * workers + logical
        mine = len(range(logical, self.skip_batches, workers))  # own batches already consumed
        batches = _with_neighbours(self._decoded_batches(stream, self.world * workers))
        for index, (previous, batch, following) in enumerate(batches):
            if index < mine:
                continue
            rng = np.random.default_rng([self.seed, TASK_IDS[self.task], stream, index])
            pool = [s["text"] for s in (previous or following or []) if "text" in s]
            yield self._collate(batch[0], batch[1], pool, rng)

    def _raw_samples(self, stream: int, streams: int) -> Iterator[dict]:
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, TASK_IDS[self.task], epoch]).permutation(len(self.tars))
            tars = [self.tars[i] for i in order]
            # Enough shards: each stream reads whole shards; too few: every stream reads all, keeps its share.
            by_shard = len(tars) >= streams
            seen = 0
            source = tars[stream::streams] if by_shard else tars
            for position, sample in enumerate(wds.tarfile_samples([{"url": t} for t in source])):
                if by_shard or position % streams == stream:
                    seen += 1
                    yield sample
            if seen == 0:
                raise PmdError(f"task '{self.task}': data stream {stream} of {streams} got no samples in an epoch")

    def _decoded_batches(self, stream: int, streams: int) -> Iterator[tuple[list[dict], Counter]]:
        batch, failures = [], Counter()
        for raw in self._raw_samples(stream, streams):
            sample, reason = decode_sample(raw, self.task)
            if reason:
                failures[reason] += 1  # a corrupt sample is counted and replaced, so batches stay equal
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch, failures
                batch, failures = [], Counter()

    def _collate(self, samples, failures, pool, rng) -> dict:
        out: dict = {"failures": dict(failures)}
        if self.task in ("pairs", "image"):
            out["pixel_values"] = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
            masks = np.stack([block_mask(rng).reshape(-1) for _ in samples])
            out["bool_masked_pos"] = torch.from_numpy(masks)
            out["mim_labels"] = torch.from_numpy(np.stack([s["tokens"].reshape(-1) for s in samples]).astype(np.int64))
        if self.task in ("pairs", "text"):
            texts = [s["text"] for s in samples]
            if self.task == "pairs":
                texts, out["itm_labels"] = _itm_negatives(texts, pool, rng)
            out.update(self._tokenize(texts, rng))
        return out

    def _tokenize(self, texts: list[str], rng: np.random.Generator) -> dict:
        if self._tokenizer is None:  # loaded once per worker process
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
        tok = self._tokenizer
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        special = np.isin(ids, tok.all_special_ids)
        masked, labels = zip(
            *(mlm_mask(row, sp, rng, tok.mask_token_id, len(tok)) for row, sp in zip(ids, special, strict=False)),
            strict=False,
        )
        return {
            "input_ids": torch.from_numpy(ids),
            "input_ids_masked": torch.from_numpy(np.stack(masked)),
            "mlm_labels": torch.from_numpy(np.stack(labels)),
            "attention_mask": torch.from_numpy(enc["attention_mask"].astype(np.int64)),
        }


def _itm_negatives(texts: list[str], pool: list[str], rng: np.random.Generator):
    """Swap about half the captions for one from a neighbouring batch: negatives never come from this batch."""
    texts, labels = list(texts), np.ones(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        others = [p for p in pool if p != text]
        if others and rng.random() < ITM_NEGATIVE_RATE:
            texts[i], labels[i] = others[rng.integers(len(others))], 0
    return texts, torch.from_numpy(labels)


def _with_neighbours(items: Iterator) -> Iterator[tuple]:
    """(previous, current, next) for each item; previous is None for the first."""
    previous, current = None, next(items)
    for following in items:
        yield previous and previous[0], current, following[0]
        previous, current = current, following


def decode_sample(raw: dict, task: str) -> tuple[dict | None, str | None]:
    """The fields a task needs, or a reason code why the sample cannot be used."""
    sample = {}
    if task in ("pairs", "text"):
        if "txt" not in raw:
            return None, "no_text"
        sample["text"] = raw["txt"].decode("utf-8", errors="replace").strip()
        if not sample["text"]:
            return None, "empty_text"
    if task in ("pairs", "image"):
        if "jpg" not in raw:
            return None, "no_image"
        if "dvae.npy" not in raw:
            return None, "no_tokens"
        try:
            image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
            tokens = np.load(io.BytesIO(raw["dvae.npy"]), allow_pickle=False)
        except Exception:  # noqa: BLE001 - any decoder error means this one sample is corrupt
            return None, "decode_error"
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            return None, "wrong_image_size"
        if tokens.shape != (14, 14) or tokens.max() >= 8192:
            return None, "bad_tokens"
        # uint8 across the worker queue (4x less than float32); the model side normalises on its device.
        sample["pixels"], sample["tokens"] = np.asarray(image).transpose(2, 0, 1), tokens
    return sample, None


def make_loader(stream: TaskStream, workers: int) -> Iterator[dict]:
    # batch_size=None: workers already build whole batches; in-order delivery makes resume exact.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return iter(loader)
