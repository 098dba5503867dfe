"""dVAE tokenize stage throughput vs a straightforward fp32 batch-1 loop, same images, same run; token agreement.

Both sides use the same encoder (the seeded random codebook of the real architecture: no real weights can be
downloaded here), the same torch thread count, and start from the same stored JPEG bytes. The stage is
`tokenize_shard` on a shard tar (read, decode, LANCZOS, encode, rewrite the tar, sidecar), in fp32 (exact) and
in int8 (the opt-in CPU approximation); the baseline decodes, resizes and encodes one image at a time in fp32.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from pmd_pipeline.tokens.codebook import load_codebook
from pmd_pipeline.tokens.encoder import DvaeTokenizer, agreement, bf16_is_native, default_batch_size, encoder_pixels
from pmd_pipeline.tokens.shard import tokenize_shard
from pmd_pipeline.tokens.stage import CALIBRATION_IMAGES
from shards.files import atomic_write_json
from shards.layout import TOKENS_EXT, ShardPaths
from shards.tar import read_samples, write_tar

GFLOP_PER_IMAGE = 52.0  # the encoder at 112 px (PMD_SPEC.md)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks, for the GPU fraction


def run(args=None) -> dict:
    images = int(os.environ.get("PMD_BENCH_DVAE_IMAGES", 24))
    rounds = int(os.environ.get("PMD_BENCH_DVAE_ROUNDS", 3))
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_codebook(None, seed=0).model
    jpgs = [synthetic_jpeg(i) for i in range(images)]
    batch = default_batch_size(torch.device("cpu"))
    fp32 = DvaeTokenizer(model, "fp32", "cpu")
    started = time.perf_counter()
    # int8 calibrates on other images than it is measured on (in a build: the build's first 32 images)
    calibration = np.stack([encoder_pixels(synthetic_jpeg(1000 + i)) for i in range(CALIBRATION_IMAGES)])
    int8 = DvaeTokenizer(model, "int8", "cpu", calibration=calibration)
    int8_setup_s = time.perf_counter() - started
    seconds: dict[str, list[float]] = {"baseline": [], "stage_fp32": [], "stage_int8": []}
    tokens: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dvae_") as tmp:
        for r in range(rounds):  # interleaved, so every side sees the same background load
            start = time.perf_counter()
            tokens["baseline"] = baseline_tokens(model, jpgs)
            seconds["baseline"].append(time.perf_counter() - start)
            for name, tokenizer in (("stage_fp32", fp32), ("stage_int8", int8)):
                seconds[name].append(_stage_seconds(Path(tmp) / f"{name}{r}", jpgs, tokenizer, batch))
                tokens[name] = _shard_tokens(Path(tmp) / f"{name}{r}")
    rate = {name: images / statistics.median(s) for name, s in seconds.items()}
    result = {
        "images": images,
        "rounds": rounds,
        "torch_threads": threads,
        "codebook": "random, seed 0 (real architecture, 53.8M parameters)",
        "baseline": "fp32, batch 1, contiguous, torch.no_grad, decode+resize per image",
        "stage": f"tokenize_shard: batch {batch} (the CPU default), channels_last, tar rewrite + sidecar included",
        "baseline_images_per_s": round(rate["baseline"], 3),
        "stage_fp32_images_per_s": round(rate["stage_fp32"], 3),
        "stage_int8_images_per_s": round(rate["stage_int8"], 3),
        "seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()},
        "speedup_fp32": _paired_speedup(seconds["baseline"], seconds["stage_fp32"]),
        "speedup_int8": _paired_speedup(seconds["baseline"], seconds["stage_int8"]),
        "speedup_note": "median over rounds of baseline seconds / stage seconds measured back to back",
        "agreement_fp32_vs_reference": round(agreement(tokens["stage_fp32"], tokens["baseline"]), 5),
        "agreement_int8_vs_reference": round(agreement(tokens["stage_int8"], tokens["baseline"]), 5),
        "int8_agreement_on_held_out_calibration": round(int8.int8_agreement, 5),
        "int8_setup_seconds": round(int8_setup_s, 1),
        "int8_note": "setup (calibration + quantization) is once per actor, not per image: not in the rate",
        "reference_codes_used": int(len(np.unique(tokens["baseline"]))),
        "cpu_bf16_native": bf16_is_native(torch.device("cpu")),
    }
    result.update(bf16_cpu(model, jpgs[:4], tokens["baseline"][:4]))
    if torch.cuda.is_available():
        result.update(gpu(model, jpgs, tokens["baseline"]))
    return result


def _paired_speedup(baseline: list[float], stage: list[float]) -> float:
    return round(statistics.median(b / s for b, s in zip(baseline, stage, strict=True)), 2)


def _stage_seconds(out: Path, jpgs: list[bytes], tokenizer: DvaeTokenizer, batch: int) -> float:
    paths = make_shard(out, jpgs)
    start = time.perf_counter()
    tokenize_shard(paths, tokenizer, "random, seed 0", batch_size=batch)
    return time.perf_counter() - start


def _shard_tokens(out: Path) -> np.ndarray:
    return np.stack([np.load(io.BytesIO(s[TOKENS_EXT])) for s in read_samples(ShardPaths(out, "bench", 0).tar)])


def synthetic_jpeg(seed: int) -> bytes:
    """A 224x224 JPEG with smooth shapes and texture (closer to photos than white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    channels = [np.sin(xx * rng.uniform(2, 12) + yy * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (224, 224, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def make_shard(out: Path, jpgs: list[bytes]) -> ShardPaths:
    paths = ShardPaths(out, "bench", 0)
    paths.folder.mkdir(parents=True)
    _, sha = write_tar(paths.tar, [{"__key__": f"k{i:05d}", "jpg": j} for i, j in enumerate(jpgs)])
    atomic_write_json(paths.stats, {"tar_sha256": sha})
    return paths


def baseline_tokens(model: torch.nn.Module, jpgs: list[bytes]) -> np.ndarray:
    """The straightforward loop: one image at a time, fp32, default memory format."""
    model = model.to(memory_format=torch.contiguous_format)
    out = []
    with torch.no_grad():
        for jpg in jpgs:
            x = torch.from_numpy(encoder_pixels(jpg))[None]
            out.append(model(x).argmax(1)[0].numpy().astype(np.uint16))
    return np.stack(out)


def bf16_cpu(model: torch.nn.Module, jpgs: list[bytes], reference: np.ndarray) -> dict:
    tokenizer = DvaeTokenizer(model, "bf16", "cpu")
    pixels = np.stack([encoder_pixels(j) for j in jpgs])
    start = time.perf_counter()
    tokens = tokenizer.tokens(pixels)
    seconds = time.perf_counter() - start
    return {
        "cpu_bf16_images_per_s": round(len(jpgs) / seconds, 3),
        "cpu_bf16_agreement_vs_fp32": round(agreement(tokens, reference), 5),
    }


def gpu(model: torch.nn.Module, jpgs: list[bytes], reference: np.ndarray) -> dict:
    tokenizer = DvaeTokenizer(model, "auto", "cuda")
    pixels = np.stack([encoder_pixels(j) for j in jpgs] * max(1, 512 // len(jpgs)))[:512]
    tokenizer.tokens(pixels[:64])  # warm-up: cuDNN picks its algorithms
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = tokenizer.tokens(pixels)
    torch.cuda.synchronize()
    per_s = len(pixels) / (time.perf_counter() - start)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    tflops = per_s * GFLOP_PER_IMAGE / 1000
    return {
        "gpu": name,
        "gpu_precision": tokenizer.precision,
        "gpu_images_per_s": round(per_s, 1),
        "gpu_tflops": round(tflops, 1),
        "gpu_fraction_of_peak": round(tflops / peak, 3) if peak else None,
        "gpu_agreement_vs_fp32": round(agreement(tokens[: len(reference)], reference), 5),
    }
