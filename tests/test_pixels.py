"""Stored pixels are what the image shows, for every format Pillow reads; thin images cost no more than others.

The reference is Pillow's own view of the same bytes: ImageOps.exif_transpose, then convert("RGB"), alpha
composited on white. Two rules are ours, because Pillow's convert is wrong there: 16-bit samples are
scaled to 8 bits (convert clips every value over 255 to white), and alpha is composited, not dropped.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import polars as pl
import pytest
from img2dataset.resizer import Resizer
from PIL import Image, ImageOps, features

from pmd_pipeline.config import BuildConfig, ImageConfig
from pmd_pipeline.fetch.images import make_resizer, read_local

W, H = 97, 61  # odd, not square: a wrong orientation or a swapped axis cannot go unseen


def pattern(mode: str = "RGB") -> Image.Image:
    """Smooth gradients (lossy codecs keep them) that differ in every channel and direction."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def reference(data: bytes) -> np.ndarray:
    """What a viewer shows, by Pillow: upright, RGB, transparent parts on white."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def sixteen_bit_grey() -> tuple[bytes, np.ndarray]:
    grey = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)
    return cv2.imencode(".png", grey)[1].tobytes(), np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, -1)


def sixteen_bit_rgb() -> tuple[bytes, np.ndarray]:
    low = (np.arange(W, dtype=np.uint16) * 37 % 256)[None, :, None]  # low bytes that must not matter
    rgb = np.asarray(pattern()).astype(np.uint16) * 256 + low
    return cv2.imencode(".png", rgb[..., ::-1])[1].tobytes(), (rgb >> 8).astype(np.uint8)


def transparent(mode: str) -> Image.Image:
    rgba = np.asarray(pattern("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, W).astype(np.uint8)[None, :]  # fully transparent to opaque
    return Image.fromarray(rgba).convert(mode)


def palette_with_transparency() -> Image.Image:
    img = pattern().quantize(64)
    img.info["transparency"] = 3
    return img


CASES = {
    "jpeg-rgb": lambda: encode(pattern(), "JPEG", quality=90),
    "jpeg-progressive": lambda: encode(pattern(), "JPEG", progressive=True),
    "jpeg-grey": lambda: encode(pattern("L"), "JPEG"),
    "jpeg-cmyk": lambda: encode(pattern("CMYK"), "JPEG"),
    **{f"jpeg-orientation-{o}": (lambda o=o: encode(pattern(), "JPEG", exif=with_orientation(o))) for o in range(2, 9)},
    "png-rgb": lambda: encode(pattern(), "PNG"),
    "png-grey": lambda: encode(pattern("L"), "PNG"),
    "png-1bit": lambda: encode(pattern("1"), "PNG"),
    "png-palette": lambda: encode(pattern().quantize(64), "PNG"),
    "png-palette-transparent": lambda: encode(palette_with_transparency(), "PNG"),
    "png-rgba": lambda: encode(transparent("RGBA"), "PNG"),
    "png-grey-alpha": lambda: encode(transparent("LA"), "PNG"),
    "png-orientation-6": lambda: encode(pattern(), "PNG", exif=with_orientation(6)),
    "gif": lambda: encode(pattern().quantize(128), "GIF"),
    "gif-transparent": lambda: encode(palette_with_transparency(), "GIF"),
    "webp-lossless": lambda: encode(pattern(), "WEBP", lossless=True),
    "webp-lossy-alpha": lambda: encode(transparent("RGBA"), "WEBP", quality=80),
    "webp-orientation-8": lambda: encode(pattern(), "WEBP", exif=with_orientation(8)),
    "tiff-rgb": lambda: encode(pattern(), "TIFF"),
    "tiff-cmyk": lambda: encode(pattern("CMYK"), "TIFF"),
    "tiff-orientation-6": lambda: encode(pattern(), "TIFF", exif=with_orientation(6)),
    "bmp": lambda: encode(pattern(), "BMP"),
    "avif": lambda: encode(pattern(), "AVIF", quality=90),
    "avif-orientation-3": lambda: encode(pattern(), "AVIF", exif=with_orientation(3)),
    "jpeg2000": lambda: encode(pattern(), "JPEG2000"),
}
NEEDS = {"avif": "avif", "jpeg2000": "jpg_2000"}


def _case(name: str) -> bytes:
    feature = NEEDS.get(name.split("-")[0])
    if feature and not features.check(feature):
        pytest.skip(f"this Pillow has no {feature} support")
    return CASES[name]()


def _png_rgb(encoded: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]


def stored_pixels(data: bytes) -> np.ndarray:
    """What the pipeline stores, without resizing and losslessly (PNG), read back as RGB."""
    resizer = make_resizer(ImageConfig(resize_mode="no", encode_format="png", encode_quality=1))
    encoded, width, height, original_width, original_height, error = resizer(io.BytesIO(data))
    assert error is None, error
    stored = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint8 and stored.ndim == 3 and stored.shape[2] == 3, "8-bit, three channels"
    assert (width, height) == (original_width, original_height) == (stored.shape[1], stored.shape[0])
    return stored[..., ::-1]


@pytest.mark.parametrize("name", CASES)
def test_stored_pixels_are_what_pillow_shows(name):
    data = _case(name)
    expected = reference(data)
    got = stored_pixels(data)
    assert got.shape == expected.shape, f"{got.shape} != {expected.shape}: orientation lost"
    tolerance = 1 if "alpha" in name or "transparent" in name or name == "png-rgba" else 0  # compositing rounding
    assert np.abs(got.astype(int) - expected).max() <= tolerance


@pytest.mark.parametrize("make", [sixteen_bit_grey, sixteen_bit_rgb], ids=["png-16bit-grey", "png-16bit-rgb"])
def test_16_bit_samples_are_scaled_to_8_bits(make):
    data, expected = make()
    got = stored_pixels(data)
    assert np.abs(got.astype(int) - expected).max() == 0, "each sample's high byte"


def test_a_resized_image_is_the_reference_resized_by_img2dataset():
    """Resizing is img2dataset's, on the reference pixels: decoding is the only thing that changed."""
    for name in ("jpeg-orientation-6", "png-palette-transparent", "jpeg-cmyk", "png-grey"):
        data = CASES[name]()
        as_png = cv2.imencode(".png", reference(data)[..., ::-1])[1].tobytes()
        ours = make_resizer(ImageConfig(size=32))(io.BytesIO(data))
        theirs = _img2dataset(ImageConfig(size=32))(io.BytesIO(as_png))
        assert ours[0] == theirs[0] and ours[1:] == theirs[1:], name


def _img2dataset(image: ImageConfig) -> Resizer:
    return Resizer(
        image_size=image.size,
        resize_mode=image.resize_mode,
        resize_only_if_bigger=False,
        encode_format=image.encode_format,
        encode_quality=image.encode_quality,
    )


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border", "no"])
def test_ordinary_rgb_images_give_the_same_bytes_as_img2datasets_own_decoding(mode):
    """8-bit RGB JPEG and PNG (nearly every image of a build) are stored byte for byte as before."""
    rng = np.random.default_rng(0)
    for size in [(97, 61), (640, 480), (300, 1000), (224, 224), (50, 20)]:
        noise = cv2.GaussianBlur(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), (7, 7), 2)
        for data in (encode(Image.fromarray(noise), "JPEG", quality=85), encode(Image.fromarray(noise), "PNG")):
            image = ImageConfig(resize_mode=mode)
            assert make_resizer(image)(io.BytesIO(data)) == _img2dataset(image)(io.BytesIO(data)), (size, mode)


def test_local_images_and_their_crops_get_the_same_pixels(tmp_path):
    """Archive and file images go through the same decoder; a crop box is in stored pixels, cut, then turned."""
    data = CASES["jpeg-orientation-6"]()
    grey16, grey16_expected = sixteen_bit_grey()
    (tmp_path / "turned.jpg").write_bytes(data)
    (tmp_path / "deep.png").write_bytes(grey16)
    box = [10, 5, 60, 40]
    rows = pl.DataFrame(
        {
            "key": ["turned", "cropped", "deep"],
            "image_path": [str(tmp_path / n) for n in ("turned.jpg", "turned.jpg", "deep.png")],
            "crop_box": [None, box, None],
        },
        schema={"key": pl.Utf8, "image_path": pl.Utf8, "crop_box": pl.List(pl.Int64)},
    )
    cfg = BuildConfig(image=ImageConfig(resize_mode="no", encode_format="png", encode_quality=1))
    got = {key: _png_rgb(f.jpg) for key, f in read_local(rows, cfg).items()}
    assert np.array_equal(got["turned"], reference(data))
    raw = Image.open(io.BytesIO(data))
    cropped = np.asarray(raw.crop(box).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert np.array_equal(got["cropped"], cropped)
    assert np.array_equal(got["deep"], grey16_expected)


# --- aspect-ratio bombs: tiny files that scaling the short side to 224 makes gigabytes ---

_THIN = """
import io, json, resource, sys, time
from PIL import Image
from pmd_pipeline.config import ImageConfig
from pmd_pipeline.fetch.images import make_resizer

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

resizer = make_resizer(ImageConfig())
images = {}
for width in (100_000, 1_000_000):
    out = io.BytesIO()
    Image.new("RGB", (width, 10), (200, 30, 30)).save(out, "PNG")
    images[width] = out.getvalue()
# the cap: what this process maps now, plus 1 GiB (scaling 1,000,000 x 10 to 224 asks for 15 GB)
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 2**30, resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for width, data in images.items():
    started = time.monotonic()
    error = resizer(io.BytesIO(data))[-1]
    results[width] = {"error": error, "seconds": time.monotonic() - started, "kb": len(data) // 1024}
results["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(results))
"""


def test_thin_images_are_refused_from_their_header_with_bounded_work():
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # albumentations asks pypi.org on import otherwise
    run = subprocess.run([sys.executable, "-c", _THIN], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for width in ("100000", "1000000"):
        assert results[width]["error"].startswith("pmd:image_aspect_ratio"), results[width]
        assert results[width]["seconds"] < 0.5, results[width]
    assert results["rss_growth_mb"] < 100, results


def test_the_aspect_ratio_limit_is_configurable_and_applies_to_a_crop():
    strip = encode(Image.new("RGB", (400, 10)), "PNG")  # 40:1
    assert make_resizer(ImageConfig())(io.BytesIO(strip))[-1].startswith("pmd:image_aspect_ratio")
    assert make_resizer(ImageConfig(max_aspect_ratio=50))(io.BytesIO(strip))[-1] is None
    started = time.monotonic()
    square = encode(Image.new("RGB", (400, 400)), "PNG")
    thin_crop = make_resizer(ImageConfig()).resize_bytes(square, [0, 0, 400, 10])
    assert thin_crop[-1].startswith("pmd:image_aspect_ratio") and time.monotonic() - started < 1
