"""Fetch stage: URL images through img2dataset's per-shard downloader, local images from files and archives.

Both paths end in the same `Fetched` record per sample key, resized by the same img2dataset Resizer, so
URL and local sources produce identical pixels for identical inputs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pyarrow as pa
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from PIL import Image

from pmd_pipeline.config import BuildConfig, ImageConfig
from pmd_pipeline.faults import crash_point
from pmd_pipeline.fetch.archives import ArchiveReader
from pmd_pipeline.fetch.mirror import rewrite_url
from pmd_pipeline.fetch.reasons import reason_code
from pmd_pipeline.fetch.web import WebPolicy, installed
from shards.writer import Fetched

ALLOWED_SCHEMES = ("http://", "https://")


class GuardedResizer(Resizer):
    """img2dataset's Resizer, after a look at the image header: a decompression bomb is refused undecoded.

    img2dataset checks the area only after cv2 has decoded the whole image (gigabytes for a crafted PNG).
    Pillow reads the size from the header alone. An image Pillow cannot identify is refused too, so no
    format reaches cv2's decoder unchecked. The Resizer always re-encodes: no web bytes reach a shard as is.
    """

    def __init__(self, max_pixels: int, **kwargs):
        super().__init__(max_image_area=max_pixels, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        refusal = header_refusal(img_stream, self.max_pixels)
        if refusal:
            return None, None, None, None, None, refusal
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


def header_refusal(img_stream, max_pixels: int) -> str | None:
    """An error message when the header says no, else None."""
    img_stream.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(img_stream) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        return f"pmd:image_too_many_pixels: {err}"
    except Exception as err:  # Pillow raises many types for non-images (HTML, truncated headers)
        return f"Image decoding error: not an image Pillow can identify ({type(err).__name__})"
    if width * height > max_pixels:
        return f"pmd:image_too_many_pixels: {width}x{height} > {max_pixels} pixels"
    return None


def make_resizer(image: ImageConfig) -> Resizer:
    return GuardedResizer(
        max_pixels=image.max_pixels,
        image_size=image.size,
        resize_mode=image.resize_mode,
        resize_only_if_bigger=False,
        encode_format=image.encode_format,
        encode_quality=image.encode_quality,
    )


def fetch_urls(rows: pl.DataFrame, cfg: BuildConfig, work_dir: Path) -> dict[str, Fetched]:
    """Download `rows` (columns key, image_url) with img2dataset; every key gets a Fetched."""
    results: dict[str, Fetched] = {}
    allowed = rows.filter(
        pl.col("image_url").str.starts_with("http://") | pl.col("image_url").str.starts_with("https://")
    )
    for key in rows.filter(~pl.col("key").is_in(allowed["key"].implode()))["key"]:
        results[key] = Fetched(reason="url_scheme_not_allowed", error="only http and https URLs are fetched")
    if allowed.height:
        _download(allowed, cfg, work_dir, results)
    return results


def _download(rows: pl.DataFrame, cfg: BuildConfig, work_dir: Path, results: dict) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    # img2dataset deletes its input file when done and writes its own stats there: give it scratch space.
    input_file = work_dir / "input.feather"
    urls = [rewrite_url(u, cfg.fetch.mirror) for u in rows["image_url"]]
    table = pa.table({"url": urls, "pmd_key": rows["key"].to_list()})
    with pa.OSFile(str(input_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    downloader = Downloader(
        sample_writer_class=_collecting_writer(results, cfg.out),
        resizer=make_resizer(cfg.image),
        thread_count=cfg.fetch.thread_count,
        save_caption=False,
        extract_exif=False,
        output_folder=str(work_dir),
        column_list=["url", "pmd_key"],
        timeout=cfg.fetch.timeout_s,
        number_sample_per_shard=max(rows.height, 2),
        oom_shard_count=5,
        compute_hash=None,
        verify_hash_type=None,
        encode_format=cfg.image.encode_format,
        retries=0,  # our opener retries transient failures with backoff; img2dataset would retry a 404 too
        user_agent_token=cfg.fetch.user_agent_token,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    # download_shard, not __call__: __call__ swallows shard-level errors, and Ray must see them to retry.
    with installed(WebPolicy.from_config(cfg.fetch)):
        downloader.download_shard((0, str(input_file)))


def _collecting_writer(results: dict[str, Fetched], out: str):
    """An img2dataset sample-writer class that hands each outcome to `results` instead of writing files.

    Our shard writer then writes the samples in plan order, so shards are reproducible byte for byte.
    """

    class CollectingWriter:
        def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
            pass

        def write(self, img_str, key, caption, meta):
            crash_point("fetch", out)
            error = meta.get("error_message")
            results[meta["pmd_key"]] = Fetched(
                jpg=img_str,
                reason=None if img_str is not None else reason_code(error),
                error=error,
                width=meta.get("width"),
                height=meta.get("height"),
                original_width=meta.get("original_width"),
                original_height=meta.get("original_height"),
            )

        def close(self):
            pass

    return CollectingWriter


def read_local(rows: pl.DataFrame, cfg: BuildConfig) -> dict[str, Fetched]:
    """Read `rows` (columns key, image_path, crop_box) from local files/archives and resize them."""
    resizer = make_resizer(cfg.image)
    reader = ArchiveReader()
    try:
        return {
            r["key"]: _read_one(reader, resizer, r["image_path"], r["crop_box"]) for r in rows.iter_rows(named=True)
        }
    finally:
        reader.close()


def _read_one(reader: ArchiveReader, resizer: Resizer, image_path: str, crop_box) -> Fetched:
    try:
        data = reader.read(image_path)
    except FileNotFoundError as err:
        return Fetched(reason="image_missing", error=str(err))
    except (OSError, ValueError) as err:
        return Fetched(reason="archive_error", error=f"{type(err).__name__}: {err}")
    if crop_box is not None:
        data, error = _crop(data, crop_box)
        if error:
            return Fetched(reason=error, error=error)
    img, width, height, original_width, original_height, error = resizer(io.BytesIO(data))
    if error is not None:
        return Fetched(reason=reason_code(error), error=error)
    return Fetched(img, None, None, width, height, original_width, original_height)


def _crop(data: bytes, box) -> tuple[bytes | None, str | None]:
    """Cut the region [left, top, right, bottom] out of the image; PNG keeps the crop lossless for the resizer."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None, "decode_error"
    height, width = img.shape[:2]
    left, top = max(0, box[0]), max(0, box[1])
    right, bottom = min(width, box[2]), min(height, box[3])
    if right <= left or bottom <= top:
        return None, "bad_crop_box"
    return cv2.imencode(".png", img[top:bottom, left:right])[1].tobytes(), None
