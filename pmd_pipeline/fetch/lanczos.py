"""The kept window of cv2's INTER_LANCZOS4 resize of an 8-bit image, bit for bit, without computing the rest.

A centre crop scales an image so its short side is 224 px, then keeps the middle 224 x 224: cv2 computes every
column of the long side and the crop throws the others away (Visual Genome's regions: the long side is 2.0x
the short one on average, and 79% of them are scaled up, with img2dataset's Lanczos). This computes only the
kept window, with cv2's own arithmetic (OpenCV 4's `resizeGeneric_`, 8-bit fixed point):

- per output column (rows alike): fx = float((dx + 0.5) * scale - 0.5) with scale = 1 / (dst / src) in
  doubles; sx = floor(fx); the 8 weights are `interpolateLanczos4(fx - sx)` in floats, rounded to shorts
  at 2^11; the 8 taps sx-3 .. sx+4 are clamped to the image (cv2 repeats the edge pixel);
- horizontal pass: sum over the taps of pixel * weight, in int32;
- vertical pass: sum over the tapped rows of that * weight, in int32, then (v + 2^21) >> 22, saturated.

Both passes are exact integer sums (255 * 2^22 * 1.4^2 < 2^31), so computing fewer of them changes no bit.
The loops are compiled with numba: the same arithmetic in numpy cost more than cv2's full resize
(BENCHMARKS.md, issue 14). `matches_cv2()` checks the kernel against the installed cv2 once per process;
tests/test_lanczos.py compares it over hundreds of sizes and contents.
"""

from __future__ import annotations

import functools
import math
import warnings

import cv2
import numpy as np

COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS
_S45 = 0.70710678118654752440084436210485
_CS = np.array([[1, 0], [-_S45, -_S45], [0, 1], [_S45, -_S45], [-1, 0], [_S45, _S45], [0, -1], [-_S45, _S45]])


def lanczos_window(src: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """cv2.resize(src, (width, height), interpolation=INTER_LANCZOS4)[y0:y1, x0:x1] for `size` = (height, width)
    and `window` = (x0, y0, x1, y1); `src` is uint8 H x W x C, and may be a strided view."""
    height, width = size
    x0, y0, x1, y1 = window
    cols, col_weights = _taps(src.shape[1], width, x0, x1)
    rows, row_weights = _taps(src.shape[0], height, y0, y1)
    out = np.empty((y1 - y0, x1 - x0, src.shape[2]), np.uint8)
    _kernel()(src, cols, col_weights, rows, row_weights, out)
    return out


def centre_crop_geometry(height: int, width: int, side: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """albumentations 1.4's SmallestMaxSize(side) then CenterCrop(side, side): the scaled (height, width) and
    the kept window (x0, y0, x1, y1) in it."""
    scale = side / min(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    x0, y0 = (new_width - side) // 2, (new_height - side) // 2
    return (new_height, new_width), (x0, y0, x0 + side, y0 + side)


@functools.cache
def matches_cv2() -> bool:
    """Whether the kernel gives the installed cv2's pixels on a few probes (tiny, odd-ratio, saturating,
    both orientations); when not (another OpenCV's arithmetic), callers use cv2's full resize."""
    rng = np.random.default_rng(0)
    for height, width in ((1, 3), (7, 40), (61, 97), (150, 41), (224, 225)):
        scaled, window = centre_crop_geometry(height, width, 224)
        x0, y0, x1, y1 = window
        for src in (
            rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            np.where(rng.random((height, width, 1)) < 0.5, 0, 255).astype(np.uint8).repeat(3, axis=2),
        ):
            full = cv2.resize(src, scaled[::-1], interpolation=cv2.INTER_LANCZOS4)
            if not np.array_equal(lanczos_window(src, scaled, window), full[y0:y1, x0:x1]):
                warnings.warn(
                    f"pmd: the windowed Lanczos resize differs from OpenCV {cv2.__version__}'s: using cv2's full "
                    "resize (the same pixels, slower)",
                    stacklevel=2,
                )
                return False
    return True


@functools.lru_cache(maxsize=4096)  # regions repeat sizes; the weights cost ~0.2 ms for 224 positions
def _taps(src_len: int, dst_len: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """For output positions start..stop-1: the 8 source indices each reads (clamped) and their weights (int32)."""
    scale = 1.0 / (dst_len / src_len)  # cv2: scale_x = 1. / inv_scale_x, inv_scale_x = dst / src
    positions = ((np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(positions)
    fractions = positions - first  # float32, exact
    indices = np.clip(first.astype(np.int64)[:, None] + np.arange(-3, 5), 0, src_len - 1).astype(np.int32)
    indices.flags.writeable = False  # cached: shared by every caller
    weights = _weights(fractions).astype(np.int32)
    weights.flags.writeable = False
    return indices, weights


def _weights(x: np.ndarray) -> np.ndarray:
    """cv2's interpolateLanczos4 of float32 `x` (N,), as saturate_cast<short>(w * 2^11): (N, 8) int16."""
    x3 = x + np.float32(3)  # float, as in C: x + 3
    angle = (-x3).astype(np.float64) * math.pi * 0.25
    # libm's sin and cos, as cv2's std::sin/std::cos call them (numpy's own may differ in the last bit)
    sin0 = np.array([math.sin(a) for a in angle.tolist()])
    cos0 = np.array([math.cos(a) for a in angle.tolist()])
    weights = np.empty((len(x), 8), np.float32)
    total = np.zeros(len(x), np.float32)
    for i in range(8):
        offset = x3 - np.float32(i)  # float: x + 3 - i
        y = (-offset).astype(np.float64) * math.pi * 0.25
        with np.errstate(divide="ignore", invalid="ignore"):
            w = ((_CS[i, 0] * sin0 + _CS[i, 1] * cos0) / (y * y)).astype(np.float32)
        w[np.abs(offset) < np.float32(1e-6)] = np.float32(1e30)  # cv2's special case at a whole position
        weights[:, i] = w
        total += w  # float32, in cv2's order
    weights *= (np.float32(1) / total)[:, None]
    scaled = np.rint(weights * np.float32(1 << COEF_BITS))  # cvRound: to nearest, ties to even
    return np.clip(scaled, -32768, 32767).astype(np.int16)


@functools.cache
def _kernel():
    """Compiled on first use (numba is imported only here: most processes never resize up). cache=True keeps
    the machine code next to this file, so a later process loads it in ~0.1 s instead of compiling (~3 s)."""
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def window_kernel(src, cols, col_weights, rows, row_weights, out):
        n_rows, n_cols, channels = out.shape
        first_row, last_row = rows.min(), rows.max()
        line_len = n_cols * channels
        horizontal = np.empty((last_row - first_row + 1, line_len), np.int32)
        pixels = np.empty(src.shape[1] * channels, np.int32)
        for r in range(first_row, last_row + 1):  # horizontal pass: only the tapped rows, only the window
            for x in range(src.shape[1]):
                for c in range(channels):
                    pixels[x * channels + c] = src[r, x, c]
            line = horizontal[r - first_row]
            for j in range(n_cols):
                for c in range(channels):
                    total = np.int32(0)
                    for k in range(8):
                        total += pixels[cols[j, k] * channels + c] * col_weights[j, k]
                    line[j * channels + c] = total
        sums = np.empty(line_len, np.int32)
        flat = out.reshape(n_rows, line_len)
        for i in range(n_rows):  # vertical pass: whole lines, which the compiler vectorizes
            sums[:] = 0
            for k in range(8):
                weight = row_weights[i, k]
                line = horizontal[rows[i, k] - first_row]
                for t in range(line_len):
                    sums[t] += line[t] * weight
            for t in range(line_len):
                flat[i, t] = min(max((sums[t] + np.int32(1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS), 0), 255)

    return window_kernel
