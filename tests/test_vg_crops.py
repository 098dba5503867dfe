"""Visual Genome crops: the regions of one image are cut from one read and one decode of it, and every region
gets exactly what it got alone (`_read_one`, the row-by-row path): the same bytes, sizes, reason and error.
"""

from __future__ import annotations

import dataclasses
import io
import random
import tarfile
import zipfile

import numpy as np
import polars as pl
from PIL import Image

from pmd_pipeline.config import BuildConfig, ImageConfig
from pmd_pipeline.fetch import images
from pmd_pipeline.fetch.archives import ArchiveReader
from pmd_pipeline.fetch.images import _read_one, make_resizer, read_local

# 600,000 pixels: the 1000 x 600 image is refused from its header, the others (up to 800 x 600) are not.
CFG = BuildConfig(image=ImageConfig(max_pixels=500_000))


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Gradients, noise and blocks: a JPEG of it is not trivially small, and every region differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = (rng.integers(0, 255, 3) + 0.4 * x[..., None] * rng.random(3) + 0.4 * y[..., None] * rng.random(3)) % 255
    pixels += rng.normal(0, 12, pixels.shape)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        pixels[y0 : y0 + int(rng.integers(10, 150)), x0 : x0 + int(rng.integers(10, 200))] = rng.integers(0, 255, 3)
    rgb = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        rgb.putalpha(Image.fromarray(np.linspace(0, 255, width).astype(np.uint8)[None, :].repeat(height, 0)))
    return rgb if mode in ("RGB", "RGBA") else rgb.convert(mode)


def encoded(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def turned(orientation: int, width: int = 500, height: int = 375) -> bytes:
    """A JPEG whose EXIF orientation turns it for display: a crop is cut in stored pixels, then turned."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(photo(width, height, orientation), exif=exif, quality=90)


def sixteen_bit() -> bytes:
    rng = np.random.default_rng(13)
    return encoded(Image.fromarray(rng.integers(0, 65535, (150, 200), dtype=np.uint16)), "PNG")


def palette_transparent() -> bytes:
    img = photo(320, 240, 5).quantize(64)
    img.info["transparency"] = 3
    return encoded(img, "PNG")


# member -> bytes; VG's own layout: VG_100K/<image_id>.jpg in images.zip, VG_100K_2/ in images2.zip
MEMBERS = {
    "VG_100K/1.jpg": lambda: encoded(photo(800, 600, 1), quality=90),
    "VG_100K/2.jpg": lambda: turned(6),
    "VG_100K/3.jpg": lambda: encoded(photo(256, 256, 3, "L"), progressive=True),
    "VG_100K/4.png": lambda: encoded(photo(640, 480, 4, "RGBA"), "PNG"),
    "VG_100K/5.png": palette_transparent,
    "VG_100K/6.jpg": lambda: encoded(photo(800, 533, 6), quality=90)[:30_000],  # truncated body
    "VG_100K/7.jpg": lambda: b"<html>not an image</html>",
    "VG_100K/8.jpg": lambda: encoded(photo(1000, 600, 8)),  # over max_pixels
    "VG_100K/9.jpg": lambda: encoded(photo(800, 600, 9, "CMYK")),
    "VG_100K/13.png": sixteen_bit,
    # every other EXIF orientation (1 is the plain photos'), on small images
    **{f"VG_100K/o{n}.jpg": (lambda n=n: turned(n, 200, 150)) for n in (2, 3, 4, 5, 7, 8)},
}


def boxes_for(width: int, height: int, rng: random.Random) -> list:
    """Many small boxes as VG has, and every edge: clipped, outside, empty, thin, the whole image."""
    boxes: list = []
    for _ in range(30):
        w, h = rng.randint(4, width // 3), rng.randint(4, height // 3)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        boxes.append([x, y, x + w, y + h])
    boxes += [
        [-20, -10, 60, 50],  # clipped to the image
        [width - 40, height - 30, width + 100, height + 100],
        [width + 5, 0, width + 50, 40],  # outside: bad_crop_box
        [10, 10, 10, 50],  # empty
        [0, 0, width, 8],  # thin strip: image_aspect_ratio
        [5, 5, 8, 200],
        None,  # the whole image
        [0, 0, width, height],
    ]
    boxes.append(boxes[0])  # a box twice (two rows of one image, as two sources would give)
    return boxes


def vg_rows(tmp_path) -> pl.DataFrame:
    """Rows as sources/visual_genome.py makes them, the images' regions interleaved in the row order."""
    zip_path = tmp_path / "images.zip"
    members = {member: make() for member, make in MEMBERS.items()}
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for member, data in members.items():
            z.writestr(member, data)
    with zipfile.ZipFile(tmp_path / "images2.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("VG_100K_2/10.jpg", encoded(photo(640, 480, 10)))
    with tarfile.open(tmp_path / "odd.tar", "w") as t:  # a directory where an image should be: archive_error
        t.addfile(_dir_member("VG_100K/11.jpg"))
    (tmp_path / "12.jpg").write_bytes(encoded(photo(300, 200, 12)))
    rng = random.Random(0)
    paths = {f"{zip_path}::{m}": _size(data) for m, data in members.items()}
    paths |= {f"{tmp_path / 'images2.zip'}::VG_100K_2/10.jpg": (640, 480), str(tmp_path / "12.jpg"): (300, 200)}
    missing = {
        f"{zip_path}::VG_100K/404.jpg": (800, 600),
        f"{tmp_path / 'nope.zip'}::VG_100K/1.jpg": (800, 600),
        f"{tmp_path / 'odd.tar'}::VG_100K/11.jpg": (800, 600),
    }
    rows = [(path, box) for path, size in (paths | missing).items() for box in boxes_for(*size, rng)]
    rng.shuffle(rows)
    return pl.DataFrame(
        {
            "key": [f"vg{i}" for i in range(len(rows))],
            "image_path": [p for p, _ in rows],
            "crop_box": [b for _, b in rows],
        },
        schema={"key": pl.Utf8, "image_path": pl.Utf8, "crop_box": pl.List(pl.Int64)},
    )


def _size(data: bytes) -> tuple[int, int]:
    """The image's size, for its boxes (a body that is no image gets boxes of a VG-sized one)."""
    try:
        return Image.open(io.BytesIO(data)).size
    except OSError:
        return 800, 600


def _dir_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def row_by_row(rows: pl.DataFrame) -> dict:
    """The baseline: each row read and decoded alone, with a reader of its own."""
    resizer = make_resizer(CFG.image)
    out = {}
    for row in rows.iter_rows(named=True):
        reader = ArchiveReader()
        try:
            out[row["key"]] = _read_one(reader, resizer, row["image_path"], row["crop_box"])
        finally:
            reader.close()
    return out


def test_regions_cut_from_one_decode_are_what_each_row_alone_gives(tmp_path):
    rows = vg_rows(tmp_path)
    expected = row_by_row(rows)
    got = read_local(rows, CFG)
    assert list(got) == rows["key"].to_list(), "one outcome per row, in row order"
    for key, fetched in got.items():
        assert dataclasses.asdict(fetched) == dataclasses.asdict(expected[key]), key
    reasons = {f.reason for f in got.values()}
    assert reasons == {
        None,
        "bad_crop_box",
        "image_aspect_ratio",
        "image_too_many_pixels",
        "decode_error",
        "image_missing",
        "archive_error",
    }, "every outcome is exercised"
    truncated = [f for f in got.values() if f.error and "truncated" in f.error]
    assert len(truncated) > 30, "each region of the truncated image that needs its pixels fails alike"


def test_on_image_gets_each_rows_outcome_once(tmp_path):
    rows = vg_rows(tmp_path)
    seen = []
    got = read_local(rows, CFG, on_image=lambda key, fetched: seen.append((key, fetched)))
    assert len(seen) == rows.height
    assert sorted(key for key, _ in seen) == sorted(got), "each row's key, once"
    assert all(got[key] is fetched for key, fetched in seen), "with that row's returned outcome"


def test_an_image_is_read_opened_and_decoded_once_for_all_its_regions(tmp_path, monkeypatch):
    rows = vg_rows(tmp_path)
    reads, opens, loads = [], [], []
    real_read, real_open = ArchiveReader.read, images._open_image

    def read(self, image_path):
        reads.append(image_path)
        return real_read(self, image_path)

    def open_image(data):
        img = real_open(data)
        real_load = img.load

        def load():
            if img.tile:  # pixels not decoded yet (crop asks again once they are)
                loads.append(img.size)
            return real_load()

        img.load = load
        opens.append(img.size)
        return img

    monkeypatch.setattr(ArchiveReader, "read", read)
    monkeypatch.setattr(images, "_open_image", open_image)
    read_local(rows, CFG)
    readable = [p for p in dict.fromkeys(rows["image_path"]) if "404" not in p and "nope" not in p and "odd" not in p]
    assert sorted(p for p in reads if p in readable) == sorted(readable), "one read per readable image"
    assert len(opens) == len(readable) - 1, "one open per image (the HTML body never opens)"
    assert len(loads) == len(readable) - 2, "one decode per image (nor does the over-sized one decode)"
