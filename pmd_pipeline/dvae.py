"""Stored pixels -> DALL-E dVAE tokens: decode the JPEG (PIL, RGB), 112x112 LANCZOS, map_pixels, encoder, argmax.

This is exactly what the trainer sees: it decodes the same KEY.jpg bytes with PIL. The encoder runs
batched, channels_last, under bf16 autocast where the device does bf16 natively (CUDA, or CPUs with
AVX512-BF16/AMX); elsewhere fp32, which is faster there (bf16 is emulated on plain AVX2).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pmd_pipeline.codebook import VOCAB_SIZE
from pmd_pipeline.errors import PmdError

INPUT_SIZE = 112  # the encoder's input; 3 max-pools later the grid is 14x14
GRID = (14, 14)
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x' = (1 - 2 eps) x + eps
PRECISIONS = ("auto", "fp32", "bf16")


class BadImage(ValueError):
    """A stored image the tokenizer cannot use; `reason` is the sample's reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def encoder_pixels(jpg: bytes) -> np.ndarray:
    """float32 [3, 112, 112] in [0.1, 0.9] from a stored (square) JPEG, like DALL-E's preprocessing."""
    try:
        image = Image.open(io.BytesIO(jpg))
        image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage("dvae_decode_error", str(err)) from None
    if image.width != image.height:
        raise BadImage("dvae_image_not_square", f"stored image is {image.width}x{image.height}")
    small = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS)
    x = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def token_problem(tokens: np.ndarray) -> str | None:
    """None when `tokens` is a valid KEY.dvae.npy array, else the reason code of the failed sample."""
    if not isinstance(tokens, np.ndarray) or tokens.shape != GRID:
        return "dvae_bad_shape"
    if tokens.dtype != np.uint16:
        return "dvae_bad_dtype"
    if tokens.size and int(tokens.max()) >= VOCAB_SIZE:
        return "dvae_out_of_range"
    return None


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_batch_size(device: torch.device) -> int:
    """Enough to keep a GPU busy (activations ~60 MB per image in bf16); small on CPUs, where batching helps little."""
    return 256 if device.type == "cuda" else 8


class DvaeTokenizer:
    """One encoder on one device; `tokens(pixels)` turns a batch of encoder pixels into uint16 [B, 14, 14]."""

    def __init__(self, model: torch.nn.Module, precision: str = "auto", device: str | torch.device | None = None):
        if precision not in PRECISIONS:
            raise PmdError(f"dVAE precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = precision == "bf16" or (precision == "auto" and bf16_is_native(self.device))
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        return logits.argmax(dim=1).to(torch.int32).cpu().numpy().astype(np.uint16)

    def tokens_of_jpegs(self, jpgs: list[bytes], batch_size: int) -> list[np.ndarray]:
        """Tokens of decodable images in order (a BadImage propagates; tokenize.py records it per sample)."""
        out: list[np.ndarray] = []
        for start in range(0, len(jpgs), batch_size):
            pixels = np.stack([encoder_pixels(j) for j in jpgs[start : start + batch_size]])
            out.extend(self.tokens(pixels))
        return out


def agreement(tokens: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of grid cells whose code equals the reference's (e.g. bf16 vs fp32)."""
    if tokens.shape != reference.shape:
        raise ValueError(f"token arrays differ in shape: {tokens.shape} vs {reference.shape}")
    return float((tokens == reference).mean()) if tokens.size else 1.0
