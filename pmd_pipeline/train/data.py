"""Stream shards into batches: decode, mask and tokenize in DataLoader workers; resumable by batch count.

Each (rank, worker) pair reads its own deterministic stream, an endless chain of epochs, and builds
whole batches. The DataLoader hands batches out round-robin over its workers, so after `n` batches of a
task every worker knows how many of its own batches were used: resume skips exactly those.
"""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.masking import block_mask, mlm_mask
from shards.tar import shard_samples

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
            packed = self._collate(batch[0], batch[1], pool, rng, shared=info is not None)
            yield packed if info else packed.unpack()  # make_loader unpacks what crosses the worker queue

    def _raw_samples(self, stream: int, streams: int) -> Iterator[dict]:
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, TASK_IDS[self.task], epoch]).permutation(len(self.tars))
            tars = [self.tars[i] for i in order]
            # Enough shards: each stream reads whole shards; too few: every stream reads all, keeps its share.
            by_shard = len(tars) >= streams
            seen = 0
            source = tars[stream::streams] if by_shard else tars
            for position, sample in enumerate(shard_samples(source)):
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

    def _collate(self, samples, failures, pool, rng, shared: bool = False) -> PackedBatch:
        arrays: dict[str, np.ndarray] = {}
        if self.task in ("pairs", "image"):
            arrays["bool_masked_pos"] = np.stack([block_mask(rng).reshape(-1) for _ in samples])
            arrays["mim_labels"] = np.stack([s["tokens"].reshape(-1) for s in samples]).astype(np.int64)
        if self.task in ("pairs", "text"):
            texts = [s["text"] for s in samples]
            if self.task == "pairs":
                texts, arrays["itm_labels"] = _itm_negatives(texts, pool, rng)
            arrays.update(self._tokenize(texts, rng))
        pixels = [s["pixels"] for s in samples] if self.task in ("pairs", "image") else None
        return PackedBatch.build(arrays, pixels, {"failures": dict(failures)}, shared)

    def _tokenize(self, texts: list[str], rng: np.random.Generator) -> dict:
        if self._tokenizer is None:  # loaded once per worker process
            self._tokenizer = _Tokenizer(self.tokenizer_dir, self.max_text_len)
        tok = self._tokenizer
        ids, attention = tok.encode(texts)
        special = np.isin(ids, tok.special_ids)
        masked, labels = zip(
            *(mlm_mask(row, sp, rng, tok.mask_id, tok.vocab) for row, sp in zip(ids, special, strict=False)),
            strict=False,
        )
        return {"input_ids": ids, "input_ids_masked": np.stack(masked), "mlm_labels": np.stack(labels),
                "attention_mask": attention}  # fmt: skip


class _Tokenizer:
    """The Hugging Face tokenizer's own Rust backend, set up once as its __call__ sets it on every call.

    tok(texts, padding="max_length", truncation=True, max_length=n) spends most of its time in Python
    around the Rust call; encode() gives the same ids and attention mask (tests pin it) at a fraction.
    """

    def __init__(self, folder: str, max_length: int):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.max_length = max_length
        self.special_ids = np.array(self.hf.all_special_ids, dtype=np.int64)
        self.mask_id, self.vocab = self.hf.mask_token_id, len(self.hf)
        self.backend = None
        if getattr(self.hf, "backend_tokenizer", None) is not None:
            from tokenizers import Tokenizer

            hf, backend = self.hf, Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
            backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=hf.truncation_side)
            backend.enable_padding(
                length=max_length, direction=hf.padding_side, pad_id=hf.pad_token_id, pad_token=hf.pad_token,
                pad_type_id=hf.pad_token_type_id, pad_to_multiple_of=None,
            )  # fmt: skip
            backend.encode_special_tokens = bool(getattr(hf, "split_special_tokens", False))
            self.backend = backend

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 [len(texts), max_length]."""
        if self.backend is None:  # a slow (Python) tokenizer: its own call
            return self.reference(texts)
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, attention

    def reference(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The Hugging Face call encode() stands for (tests compare the two)."""
        enc = self.hf(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int64): torch.int64}
_ALIGN = 64


class PackedBatch:
    """A batch's tensors as views of one uint8 buffer, plus the layout to cut them out again.

    Each tensor that crosses a DataLoader worker queue costs a shared-memory segment and a file-descriptor
    round trip on both sides; a batch of eight tensors cost more than decoding its images. One buffer, made
    in shared memory from the start (no copy when pickled), costs one. Contents and dtypes are unchanged.
    """

    def __init__(self, buffer: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple, int]], extra: dict):
        self.buffer, self.layout, self.extra = buffer, layout, extra

    @classmethod
    def build(cls, arrays: dict[str, np.ndarray], pixels: list[np.ndarray] | None, extra: dict, shared: bool):
        """pixels: each sample's CHW view of its HWC image, as decode_sample gives it; copied once, as HWC.

        pixel_values comes out [B, 3, H, W] with channels-last strides, as np.stack of those views gave it.
        """
        shapes = {k: (a.dtype, a.shape) for k, a in arrays.items()}
        if pixels is not None:
            shapes = {"pixel_values": (np.dtype(np.uint8), (len(pixels), *pixels[0].shape)), **shapes}
        layout, total = [], 0
        for key, (dtype, shape) in shapes.items():
            layout.append((key, dtype, shape, total))
            total += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        if shared:  # allocated in shared memory directly, as DataLoader's own collate does: no copy to send it
            new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # private; the public way copies
            if new_shared is not None:
                buffer = torch.empty(0, dtype=torch.uint8).set_(new_shared(total))
            else:
                buffer = torch.empty(total, dtype=torch.uint8).share_memory_()
        else:
            buffer = torch.empty(total, dtype=torch.uint8)
        flat = buffer.numpy()
        for key, dtype, shape, offset in layout:
            view = flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype)
            if key == "pixel_values":
                view = view.reshape(_channels_last(shape))
                for row, image in zip(view, pixels, strict=True):
                    row[...] = image.transpose(1, 2, 0)  # HWC memory to HWC memory: a plain copy
            else:
                view.reshape(shape)[...] = arrays[key]
        return cls(buffer, [(k, _TORCH_DTYPES[d], s, o) for k, d, s, o in layout], extra)

    def unpack(self) -> dict:
        out = dict(self.extra)
        for key, dtype, shape, offset in self.layout:
            view = self.buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype)
            if key == "pixel_values":
                out[key] = view.view(_channels_last(shape)).permute(0, 3, 1, 2)
            else:
                out[key] = view.view(shape)
        return out


def _channels_last(shape: tuple) -> tuple:
    batch, channels, height, width = shape
    return batch, height, width, channels


def _itm_negatives(texts: list[str], pool: list[str], rng: np.random.Generator):
    """Swap about half the captions for one from a neighbouring batch: negatives never come from this batch."""
    texts, labels = list(texts), np.ones(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        others = [p for p in pool if p != text]
        if others and rng.random() < ITM_NEGATIVE_RATE:
            texts[i], labels[i] = others[rng.integers(len(others))], 0
    return texts, labels


def _with_neighbours(items: Iterator) -> Iterator[tuple]:
    """(previous, current, next) for each item; previous is None for the first."""
    previous, current = None, next(items)
    for following in items:
        yield previous and previous[0], current, following[0]
        previous, current = current, following


def decode_sample(raw: dict, task: str) -> tuple[dict | None, str | None]:
    """The fields a task needs, or a reason code why the sample cannot be used."""
    if "__error__" in raw:
        return None, raw["__error__"]
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
    return _unpacked(iter(loader))


def _unpacked(batches: Iterator) -> Iterator[dict]:
    for batch in batches:
        yield batch.unpack() if isinstance(batch, PackedBatch) else batch
