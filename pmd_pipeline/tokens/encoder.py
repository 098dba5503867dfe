"""Stored pixels -> DALL-E dVAE tokens: decode the JPEG (PIL, RGB), 112x112 LANCZOS, map_pixels, encoder, argmax.

This is exactly what the trainer sees: it decodes the same KEY.jpg bytes with PIL. Precisions:
- fp32 (the default on CPUs): exact. bf16 autocast is slower on the CPUs we measured (emulated on AVX2,
  and slower than fp32 even with AVX512-BF16 but no AMX), so `auto` means fp32 there.
- bf16 autocast, channels_last (`auto` on CUDA GPUs with bf16): the paper-era way to run the encoder fast.
- int8 (CPU, opt-in): post-training static quantization for oneDNN (per-channel weights, activation ranges
  observed on calibration images from the build itself). About 5x fp32 on a VNNI CPU, but an approximation:
  the tokens' agreement with fp32 is measured on held-out images and recorded, and int8 tokens carry their
  own identity so they are never mixed with fp32 ones (BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import torch
from PIL import Image

from pmd_pipeline.errors import PmdError
from shards.layout import CODEBOOK_SIZE, TOKEN_GRID
from shards.sidecar import INT8_SUFFIX

INPUT_SIZE = 112  # the encoder's input; 3 max-pools later the grid is 14x14
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x' = (1 - 2 eps) x + eps
PRECISIONS = ("auto", "fp32", "bf16", "int8")


class BadImage(ValueError):
    """A stored image the tokenizer cannot use; `reason` is the sample's reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def encoder_pixels(jpg: bytes) -> np.ndarray:
    """float32 [3, 112, 112] in [0.1, 0.9] from a stored (square) JPEG, like DALL-E's preprocessing."""
    return encoder_input(encoder_rgb(jpg))


def encoder_rgb(jpg: bytes) -> np.ndarray:
    """uint8 [112, 112, 3]: the decoded, resized image, a quarter of the float input's bytes. The streaming
    build does this on the fetching CPUs and sends these to the token actors (a GPU's host CPU decodes nothing)."""
    try:
        image = Image.open(io.BytesIO(jpg))
        image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage("dvae_decode_error", str(err)) from None
    if image.width != image.height:
        raise BadImage("dvae_image_not_square", f"stored image is {image.width}x{image.height}")
    return np.asarray(image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS))


def encoder_input(rgb: np.ndarray) -> np.ndarray:
    """DALL-E's map_pixels of uint8 [..., 112, 112, 3]: float32 [..., 3, 112, 112] in [0.1, 0.9]."""
    x = np.moveaxis(rgb.astype(np.float32), -1, -3) / 255.0
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def token_problem(tokens: np.ndarray) -> str | None:
    """None when `tokens` is a valid KEY.dvae.npy array, else the reason code of the failed sample."""
    if not isinstance(tokens, np.ndarray) or tokens.shape != TOKEN_GRID:
        return "dvae_bad_shape"
    if tokens.dtype != np.uint16:
        return "dvae_bad_dtype"
    if tokens.size and int(tokens.max()) >= CODEBOOK_SIZE:
        return "dvae_out_of_range"
    return None


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_batch_size(device: torch.device) -> int:
    """Enough to keep a GPU busy (activations ~60 MB per image in bf16). On CPUs one image at a time is
    fastest: a batch's 112x112x256 activations (13 MB per image in fp32) fall out of the caches."""
    return 256 if device.type == "cuda" else 1


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PmdError(f"dVAE precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def tokens_identity(codebook_identity: str, precision: str) -> str:
    """What a shard's tokens are recorded as: int8 tokens are an approximation, never mixed with exact ones."""
    return codebook_identity + (INT8_SUFFIX if precision == "int8" else "")


class DvaeTokenizer:
    """One encoder on one device; `tokens(pixels)` turns a batch of encoder pixels into uint16 [B, 14, 14]."""

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str = "auto",
        device: str | torch.device | None = None,
        calibration: np.ndarray | None = None,
    ):
        """`calibration`: encoder pixels [N, 3, 112, 112] from the data, needed by int8 only (see `quantize_int8`);
        int8 without it waits for `calibrate` (a streaming build knows its first images only once fetched)."""
        check_precision(precision)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and bf16_is_native(self.device) else "fp32"
        self.precision = precision
        self.int8_agreement: float | None = None
        self.int8_ranges: dict[str, torch.Tensor] | None = None  # int8's activation ranges, once calibrated
        if precision == "int8":
            if self.device.type != "cpu":
                raise PmdError("dVAE precision int8 runs on CPUs only; use bf16 or fp32 on a GPU")
            self.model = model.eval()
            self.needs_calibration = True
            if calibration is not None:
                self.calibrate(calibration)
        else:
            self.model = model.eval().to(self.device, memory_format=torch.channels_last)
            self.needs_calibration = False

    def calibrate(self, calibration: np.ndarray) -> None:
        """int8: quantize the encoder with activation ranges from these encoder pixels (once)."""
        self.model, self.int8_agreement, self.int8_ranges = quantize_int8(self.model, calibration)
        self.needs_calibration = False

    def calibrate_from(self, ranges: dict[str, torch.Tensor], agreement: float) -> None:
        """int8: quantize with the activation ranges another tokenizer's `calibrate` found (`int8_ranges`):
        the same model, without its ~30 s of fp32 passes on one core."""
        self.model, self.int8_agreement, self.int8_ranges = quantize_int8_from(self.model, ranges), agreement, ranges
        self.needs_calibration = False

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        if self.needs_calibration:
            raise RuntimeError("int8 encoder used before calibrate()")
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        if self.precision == "int8":
            with torch.inference_mode(), int8_engine():
                logits = self.model(x)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
            bf16 = self.precision == "bf16"
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = self.model(x)
        return logits.argmax(dim=1).to(torch.int32).cpu().numpy().astype(np.uint16)


@contextlib.contextmanager
def int8_engine():
    """oneDNN's quantized kernels (VNNI); the engine is process-global, so set it only around our calls."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_int8(model: torch.nn.Module, calibration: np.ndarray | None) -> tuple[torch.nn.Module, float, dict]:
    """The encoder's layers in int8 (per-channel symmetric weights; activation ranges from min/max, which
    agreed better with fp32 than histogram ranges: 92.7% vs 89% of cells on the random codebook), the
    agreement of its tokens with fp32 on held-out calibration images, and the activation ranges found
    (`quantize_int8_from` makes the same model from them).

    The first half of `calibration` sets the activation ranges, the second half is only compared, so the
    agreement is not measured on the images the ranges were fitted to. Deterministic for the same images.
    Uses torch.ao's FX quantization (deprecated in favour of torchao's pt2e, which needs an inductor compile;
    torch is pinned, so this stays available).
    """
    if calibration is None or len(calibration) < 2:
        raise PmdError("dVAE precision int8 needs at least 2 calibration images from the shards")
    x = torch.from_numpy(np.ascontiguousarray(calibration))
    fit, held_out = x[: (len(x) + 1) // 2], x[(len(x) + 1) // 2 :]
    with int8_engine(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = _prepared(model)
        with torch.no_grad():
            for image in fit:  # one at a time, as the stage runs: the observers see the same shapes
                prepared(image[None])
        ranges = {k: v for k, v in prepared.state_dict().items() if ACTIVATION_RANGES in k}
        quantized = _convert(prepared)
        with torch.inference_mode():
            exact = torch.cat([model.blocks(image[None]).argmax(1) for image in held_out])
            approx = torch.cat([quantized(image[None]).argmax(1) for image in held_out])
    return quantized, agreement(approx.numpy(), exact.numpy()), ranges


ACTIVATION_RANGES = "activation_post_process"  # torch.ao's name for the observers in a prepared model


def quantize_int8_from(model: torch.nn.Module, ranges: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`quantize_int8`'s model from its activation ranges, without observing images (a test checks that the
    logits are equal); the weights' ranges are the weights' own, found again at convert."""
    with int8_engine(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = _prepared(model)
        loaded = prepared.load_state_dict(ranges, strict=False)  # strict=False: the weights are not in `ranges`
        wrong = loaded.unexpected_keys + [k for k in loaded.missing_keys if ACTIVATION_RANGES in k]
        if wrong:
            raise ValueError(f"int8 ranges for another model: {wrong[:3]}")
        return _convert(prepared)


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    qconfig = QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    return prepare_fx(copy.deepcopy(model.blocks), QConfigMapping().set_global(qconfig), (example,))


def _convert(prepared: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepared)


def agreement(tokens: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of grid cells whose code equals the reference's (e.g. bf16 vs fp32)."""
    if tokens.shape != reference.shape:
        raise ValueError(f"token arrays differ in shape: {tokens.shape} vs {reference.shape}")
    return float((tokens == reference).mean()) if tokens.size else 1.0
