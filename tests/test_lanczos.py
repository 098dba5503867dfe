"""The window of cv2's Lanczos resize (pmd_pipeline/fetch/lanczos.py) is cv2's own output, bit for bit, and the
resizer's centre crop through it gives the pixels img2dataset's albumentations steps give."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from pmd_pipeline.config import ImageConfig
from pmd_pipeline.fetch.images import make_resizer
from pmd_pipeline.fetch.lanczos import lanczos_window, matches_cv2


def contents(rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
    """Noise, hard edges between 0 and 255 (the sums overshoot: saturation), and a smooth gradient."""
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    edges = np.where(rng.random((height, width, 1)) < 0.5, 0, 255).astype(np.uint8).repeat(3, axis=2)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    return [noise, edges, gradient.astype(np.uint8)]


def sizes(rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """(height, width, new height, new width): up- and downscales, tiny sources, whole-number and odd ratios."""
    fixed = [(1, 1, 224, 224), (1, 7, 224, 1568), (2, 3, 224, 336), (100, 150, 224, 336), (112, 112, 224, 224)]
    fixed += [(224, 300, 224, 300), (300, 224, 224, 224), (500, 375, 299, 224), (37, 411, 224, 2488)]
    drawn = []
    for _ in range(count):
        h, w = int(rng.integers(1, 260)), int(rng.integers(1, 520))
        scale = 224 / min(h, w)
        drawn.append((h, w, max(1, round(h * scale)), max(1, round(w * scale))))
    return fixed + drawn


@pytest.mark.parametrize("seed", range(4))
def test_the_window_is_cv2s_own_lanczos_output(seed):
    rng = np.random.default_rng(seed)
    for height, width, new_height, new_width in sizes(rng, 60):
        for src in contents(rng, height, width):
            full = cv2.resize(src, (new_width, new_height), interpolation=cv2.INTER_LANCZOS4)
            x0 = int(rng.integers(0, max(1, new_width - 224) + 1))
            y0 = int(rng.integers(0, max(1, new_height - 224) + 1))
            window = (x0, y0, min(new_width, x0 + 224), min(new_height, y0 + 224))
            got = lanczos_window(src, (new_height, new_width), window)
            want = full[window[1] : window[3], window[0] : window[2]]
            assert np.array_equal(got, want), (height, width, new_height, new_width, window)


def test_a_strided_view_is_read_as_cv2_reads_it():
    """Regions come as slices of the whole image (their rows are strided): the same output as a copy's."""
    whole = np.random.default_rng(7).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    region = whole[40:140, 55:205]
    want = cv2.resize(np.ascontiguousarray(region), (336, 224), interpolation=cv2.INTER_LANCZOS4)[:, 56:280]
    assert np.array_equal(lanczos_window(region, (224, 336), (56, 0, 280, 224)), want)


def test_the_resizers_centre_crop_is_albumentations_pixels():
    resizer = make_resizer(ImageConfig())  # 224 px centre crop, Lanczos up, area down
    scale = A.SmallestMaxSize(max_size=224, interpolation=cv2.INTER_LANCZOS4, p=1.0)
    crop = A.CenterCrop(height=224, width=224)
    rng = np.random.default_rng(11)
    for height, width, _, _ in sizes(rng, 40):
        if min(height, width) > 224:
            continue  # a downscale: area interpolation, cv2's own resize as before
        for src in contents(rng, height, width):
            want = crop(image=scale(image=src)["image"])["image"]
            assert np.array_equal(resizer._resize(src), want), (height, width)


def test_the_kernel_agrees_with_the_installed_cv2():
    """The once-per-process probe the resizer trusts: when it holds, the window is used."""
    assert matches_cv2()


def test_a_region_of_a_decoded_image_gets_albumentations_pixels():
    """The Visual Genome path end to end: a real JPEG decoded once, regions cut from it, each resized."""
    rng = np.random.default_rng(3)
    whole = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 2)
    _, jpeg = cv2.imencode(".jpg", whole)
    resizer = make_resizer(ImageConfig())
    boxes = [(10, 20, 60, 170), (300, 200, 460, 260), (0, 0, 640, 480), (600, 400, 640, 480)]
    decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    scale = A.SmallestMaxSize(max_size=224, interpolation=cv2.INTER_LANCZOS4, p=1.0)
    down = A.SmallestMaxSize(max_size=224, interpolation=cv2.INTER_AREA, p=1.0)
    crop = A.CenterCrop(height=224, width=224)
    for box, (encoded, width, height, *_rest, error) in zip(
        boxes, resizer.resize_regions(jpeg.tobytes(), boxes), strict=True
    ):
        assert error is None and (width, height) == (224, 224)
        region = decoded[box[1] : box[3], box[0] : box[2]]
        resize = down if min(region.shape[:2]) > 224 else scale
        want = crop(image=resize(image=region)["image"])["image"]
        assert encoded == cv2.imencode(".jpg", want, params=resizer.encode_params)[1].tobytes(), box


def test_a_kernel_that_differs_from_cv2_is_not_used(monkeypatch):
    """Another OpenCV's arithmetic (simulated: a kernel one level off): the probe says so, once, with a
    warning, and the resizer gives cv2's own pixels through the full resize."""
    from pmd_pipeline.fetch import lanczos

    exact = lanczos._kernel()

    def one_off(src, cols, col_weights, rows, row_weights, out):
        exact(src, cols, col_weights, rows, row_weights, out)
        out ^= 1

    monkeypatch.setattr(lanczos, "_kernel", lambda: one_off)
    lanczos.matches_cv2.cache_clear()
    try:
        with pytest.warns(UserWarning, match="differs from OpenCV"):
            assert not lanczos.matches_cv2()
        src = np.random.default_rng(5).integers(0, 256, (60, 150, 3), dtype=np.uint8)
        want = cv2.resize(src, (560, 224), interpolation=cv2.INTER_LANCZOS4)[:, 168:392]
        assert np.array_equal(make_resizer(ImageConfig())._resize(src), want)
    finally:
        lanczos.matches_cv2.cache_clear()  # the next caller probes the real kernel again
