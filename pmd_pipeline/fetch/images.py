"""Fetch stage: URL images through img2dataset's per-shard downloader, local images from files and archives.

Both paths end in the same `Fetched` record per sample key, decoded and resized by the same GuardedResizer,
so URL and local sources produce identical pixels for identical inputs.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import polars as pl
import pyarrow as pa
from img2dataset.downloader import Downloader
from img2dataset.resizer import ResizeMode, Resizer
from PIL import ExifTags, Image

from pmd_pipeline.config import BuildConfig, ImageConfig
from pmd_pipeline.faults import crash_point
from pmd_pipeline.fetch.archives import ArchiveReader
from pmd_pipeline.fetch.lanczos import centre_crop_geometry, lanczos_window, matches_cv2
from pmd_pipeline.fetch.mirror import rewrite_url
from pmd_pipeline.fetch.reasons import reason_code
from pmd_pipeline.fetch.web import WebPolicy, installed
from shards.writer import Fetched

ALLOWED_SCHEMES = ("http://", "https://")


class ImageRefused(ValueError):
    """An image we do not decode or cannot: the message starts with `pmd:<reason_code>:`."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"pmd:{code}: {detail}")


class GuardedResizer(Resizer):
    """img2dataset's Resizer (its settings, its resize steps, its encoder), fed pixels Pillow decoded once.

    - The header is read first: an image with too many pixels (a decompression bomb) or too thin an aspect
      ratio (100,000 x 10 would be scaled to 224 x 2,240,000 before the crop) is refused undecoded.
      img2dataset checks the area only after cv2 has decoded the whole image.
    - Pillow decodes every format it reads (nothing reaches a decoder unchecked), then the pixels are made
      what a viewer shows: see `viewer_pixels`. cv2 alone ignored EXIF orientation and stored 16-bit PNGs
      as garbage.
    - The image is always re-encoded: no web bytes reach a shard as is.
    """

    def __init__(self, max_pixels: int, max_aspect_ratio: float, **kwargs):
        super().__init__(max_image_area=max_pixels, max_aspect_ratio=max_aspect_ratio, **kwargs)

    def __call__(self, img_stream, blurring_bbox_list=None):
        """img2dataset's downloader calls this (we give it no blurring column)."""
        img_stream.seek(0)
        return self.resize_bytes(img_stream.read())

    def resize_bytes(self, data: bytes, crop_box=None) -> tuple:
        """img2dataset's outcome tuple: (encoded, width, height, original_width, original_height, error)."""
        return self.resize_regions(data, [crop_box])[0]

    def resize_regions(self, data: bytes, crop_boxes: list) -> list[tuple]:
        """`resize_bytes` of each box (None: the whole image), from one open and at most one decode of `data`.

        A Visual Genome image has about 50 regions: decoding it once per region was over half their cost.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = _open_image(data)
            except ImageRefused as err:
                return [_refused(err) for _ in crop_boxes]
            with img:
                decoded = _DecodedOnce(img, whole=len(crop_boxes) > 1)
                return [self._resize_region(decoded, box) for box in crop_boxes]

    def _resize_region(self, decoded: _DecodedOnce, crop_box) -> tuple:
        try:
            bgr = self._region_pixels(decoded, crop_box)
        except ImageRefused as err:
            return _refused(err)
        original_height, original_width = bgr.shape[:2]
        img = self._resize(bgr)
        height, width = img.shape[:2]
        encoded = cv2.imencode(f".{self.encode_format}", img, params=self.encode_params)[1].tobytes()
        return encoded, width, height, original_width, original_height, None

    def _region_pixels(self, decoded: _DecodedOnce, crop_box) -> np.ndarray:
        """The header checks first (no decoding for a refused region), then the shared decoded pixels, BGR."""
        try:
            box = _crop_rect(decoded.img, crop_box)
            self._check_shape(box[2] - box[0], box[3] - box[1], decoded.img.size)
            return decoded.bgr(None if crop_box is None else box)
        except ImageRefused:
            raise
        except Exception as err:  # a truncated or corrupt body fails in Pillow's decoder, with many types
            raise ImageRefused("decode_error", f"Image decoding error: {type(err).__name__}: {err}") from None

    def _check_shape(self, width: int, height: int, full: tuple[int, int]) -> None:
        """From the header alone: the whole image is decoded (its pixels), the region is resized (its ratio)."""
        if full[0] * full[1] > self.max_image_area:
            raise ImageRefused("image_too_many_pixels", f"{full[0]}x{full[1]} > {self.max_image_area} pixels")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise ImageRefused("image_aspect_ratio", f"{width}x{height} is thinner than 1:{self.max_aspect_ratio:g}")

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """img2dataset 1.47's resize steps (the same albumentations transforms, so the same pixels)."""
        cv2.setNumThreads(1)
        height, width = img.shape[:2]
        mode = self.resize_mode
        if mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
            downscale = min(width, height) > self.image_size
            if self.resize_only_if_bigger and not downscale:
                return img
            interpolation = self.downscale_interpolation if downscale else self.upscale_interpolation
            if mode == ResizeMode.center_crop and _windowed(img, interpolation) and matches_cv2():
                return self._lanczos_center_crop(img)
            scale = _transform(A.SmallestMaxSize, max_size=self.image_size, interpolation=interpolation, p=1.0)
            img = scale(image=img)["image"]
            if mode == ResizeMode.center_crop:
                img = _transform(A.CenterCrop, height=self.image_size, width=self.image_size)(image=img)["image"]
        elif mode in (ResizeMode.border, ResizeMode.keep_ratio_largest):
            downscale = max(width, height) > self.image_size
            if self.resize_only_if_bigger and not downscale:
                return img
            interpolation = self.downscale_interpolation if downscale else self.upscale_interpolation
            scale = _transform(A.LongestMaxSize, max_size=self.image_size, interpolation=interpolation, p=1.0)
            img = scale(image=img)["image"]
            if mode == ResizeMode.border:
                pad = _transform(
                    A.PadIfNeeded,
                    min_height=self.image_size,
                    min_width=self.image_size,
                    border_mode=cv2.BORDER_CONSTANT,
                    value=[255, 255, 255],
                    p=1.0,
                )
                img = pad(image=img)["image"]
        return img

    def _lanczos_center_crop(self, img: np.ndarray) -> np.ndarray:
        """SmallestMaxSize then CenterCrop, as above (albumentations 1.4's size and crop arithmetic), with only
        the kept window of cv2's Lanczos computed: the same pixels at 1/2 to 1/5 of the cost (fetch/lanczos.py)."""
        height, width = img.shape[:2]
        scaled, window = centre_crop_geometry(height, width, self.image_size)
        if scaled == (height, width):  # albumentations and cv2 return the image as it is
            return np.ascontiguousarray(img[window[1] : window[3], window[0] : window[2]])
        return lanczos_window(img, scaled, window)


def _windowed(img: np.ndarray, interpolation: int) -> bool:
    """The case fetch/lanczos.py reproduces: 8-bit colour pixels under Lanczos (an upscale, img2dataset's)."""
    return interpolation == cv2.INTER_LANCZOS4 and img.dtype == np.uint8 and img.ndim == 3


_BUILT = threading.local()  # per thread: img2dataset's download threads share one resizer


def _transform(cls, **params):
    """An albumentations transform, built once per thread and settings: building SmallestMaxSize and
    CenterCrop (their argument validation) took 0.55 ms CPU per region, a fifth of a Visual Genome
    region's work once its image's decode is shared.
    The transforms we use are deterministic (p=1, no random parameters), so reusing one changes no pixel.
    """
    built = vars(_BUILT).setdefault("transforms", {})
    key = (cls, repr(params))  # repr: PadIfNeeded's value is a list
    if key not in built:
        built[key] = cls(**params)
    return built[key]


def _open_image(data: bytes) -> Image.Image:
    """Pillow reads the header only; it refuses what it cannot identify (HTML, a truncated header)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRefused("image_too_many_pixels", str(err)) from None
    except Exception as err:  # Pillow raises many types for non-images
        detail = f"Image decoding error: not an image Pillow can identify ({type(err).__name__})"
        raise ImageRefused("decode_error", detail) from None


def _refused(err: ImageRefused) -> tuple:
    return None, None, None, None, None, str(err)


def _crop_rect(img: Image.Image, crop_box) -> tuple[int, int, int, int]:
    """The region to keep, clipped to the image: the whole image without a box."""
    width, height = img.size
    if crop_box is None:
        return 0, 0, width, height
    left, top = max(0, crop_box[0]), max(0, crop_box[1])
    right, bottom = min(width, crop_box[2]), min(height, crop_box[3])
    if right <= left or bottom <= top:
        raise ImageRefused("bad_crop_box", f"{list(crop_box)} is outside the {width}x{height} image")
    return left, top, right, bottom


# EXIF orientation -> the transpose that shows the image upright, as Pillow's ImageOps.exif_transpose does.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints, read as 16-bit samples
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def viewer_pixels(img: Image.Image, box=None) -> np.ndarray:
    """What a viewer shows, as RGB uint8: the first frame, EXIF orientation applied, 16-bit scaled to 8-bit
    (Pillow's convert would clip every value over 255 to white), palette, CMYK (Pillow's conversion, no ICC
    profile), grey and 1-bit as RGB, and alpha composited on white (img2dataset's matting).

    A crop box is in stored-pixel coordinates (annotation tools, like browsers then, ignored EXIF): the
    region is cut first, then turned upright.
    """
    return _DecodedOnce(img).pixels(box)


class _DecodedOnce:
    """An opened image, decoded on its first region only: all its regions share the pixels and orientation.

    The orientation is read after loading, as exif_transpose does: Pillow's TIFF decoder turns the pixels
    upright itself and then drops the tag. A failed decode is kept and raised for every later region, as
    each region alone would fail, without decoding the broken body again.

    `whole`: the image has several regions, so its whole viewer pixels are made once, in cv2's BGR, and each
    region is a slice of them turned upright with numpy. The conversions are per pixel and commute with
    cutting and turning, so the pixels are those of cutting first (a test compares every orientation and
    mode); cutting with Pillow and converting each region took a tenth of a Visual Genome region's CPU.
    """

    def __init__(self, img: Image.Image, whole: bool = False):
        self.img = img
        self._orientation: int | None = None
        self._error: Exception | None = None
        self.whole = whole
        self._whole_bgr: np.ndarray | None = None

    def pixels(self, box=None) -> np.ndarray:
        return _upright_rgb(self.img, self._load(), box)

    def bgr(self, box=None) -> np.ndarray:
        """`pixels(box)` in cv2's channel order, for its resize."""
        orientation = self._load()
        if not self.whole:
            return cv2.cvtColor(_upright_rgb(self.img, orientation, box), cv2.COLOR_RGB2BGR)
        if self._whole_bgr is None:
            self._whole_bgr = cv2.cvtColor(_upright_rgb(self.img, 1, None), cv2.COLOR_RGB2BGR)
        left, top, right, bottom = box if box is not None else (0, 0, *self.img.size)
        return _turned(self._whole_bgr[top:bottom, left:right], orientation)

    def _load(self) -> int:
        if self._error is not None:
            raise self._error.with_traceback(None)  # the same error, without each region's traceback piled on
        if self._orientation is None:
            try:
                self.img.load()
            except Exception as err:
                self._error = err
                raise
            self._orientation = _orientation(self.img)
        return self._orientation


# EXIF orientation -> the same turn as _ORIENTATION's, on an H x W x C array
_TURNS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _turned(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A slice turned upright; cv2 takes a slice of rows as it is, a turned view as a contiguous copy."""
    if orientation not in _TURNS:
        return pixels
    return np.ascontiguousarray(_TURNS[orientation](pixels))


def _upright_rgb(img: Image.Image, orientation: int, box) -> np.ndarray:
    """`viewer_pixels` of loaded pixels; `img` itself is left as it is (its other regions follow)."""
    if box is not None:
        img = img.crop(box)
    if orientation in _ORIENTATION:
        img = img.transpose(_ORIENTATION[orientation])
    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "F":  # float samples: 0.0 is black, 1.0 white
        img = Image.fromarray(np.rint(np.clip(np.asarray(img), 0.0, 1.0) * 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))


def _orientation(img: Image.Image) -> int:
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block says nothing about the pixels: show them as stored
        return 1


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """rgb * a/255 + 255 - a, rounded: img2dataset's matting, in uint16 (exact: the sum never passes 65152)."""
    alpha = rgba[:, :, 3:].astype(np.uint16)
    mixed = rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127
    return (mixed // 255).astype(np.uint8)


def make_resizer(image: ImageConfig) -> GuardedResizer:
    return GuardedResizer(
        max_pixels=image.max_pixels,
        max_aspect_ratio=image.max_aspect_ratio,
        image_size=image.size,
        resize_mode=image.resize_mode,
        resize_only_if_bigger=False,
        encode_format=image.encode_format,
        encode_quality=image.encode_quality,
    )


def fetch_urls(rows: pl.DataFrame, cfg: BuildConfig, work_dir: Path, on_image=None) -> dict[str, Fetched]:
    """Download `rows` (columns key, image_url) with img2dataset; every key gets a Fetched, also handed to
    `on_image(key, fetched)` as soon as it is known (live progress, int8's early calibration)."""
    results: dict[str, Fetched] = {}
    on_image = on_image or (lambda key, fetched: None)
    allowed = rows.filter(
        pl.col("image_url").str.starts_with("http://") | pl.col("image_url").str.starts_with("https://")
    )
    for key in rows.filter(~pl.col("key").is_in(allowed["key"].implode()))["key"]:
        results[key] = Fetched(reason="url_scheme_not_allowed", error="only http and https URLs are fetched")
        on_image(key, results[key])
    if allowed.height:
        _download(allowed, cfg, work_dir, results, on_image)
    return results


def _download(rows: pl.DataFrame, cfg: BuildConfig, work_dir: Path, results: dict, on_image) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    # img2dataset deletes its input file when done and writes its own stats there: give it scratch space.
    input_file = work_dir / "input.feather"
    urls = [rewrite_url(u, cfg.fetch.mirror) for u in rows["image_url"]]
    table = pa.table({"url": urls, "pmd_key": rows["key"].to_list()})
    with pa.OSFile(str(input_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    downloader = Downloader(
        sample_writer_class=_collecting_writer(results, cfg.out, on_image),
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


def _collecting_writer(results: dict[str, Fetched], out: str, on_image):
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
            on_image(meta["pmd_key"], results[meta["pmd_key"]])

        def close(self):
            pass

    return CollectingWriter


def read_local(
    rows: pl.DataFrame, cfg: BuildConfig, on_image: Callable[[str, Fetched], None] | None = None
) -> dict[str, Fetched]:
    """Read `rows` (columns key, image_path, crop_box) from local files/archives and resize them.

    The rows of one image (a Visual Genome image has about 50 regions) are cut from one read and one decode
    of it, an image at a time, so a shard holds at most one decoded image. `on_image` gets each row's key and
    outcome once, as soon as its image is done (live progress).
    """
    resizer = make_resizer(cfg.image)
    reader = ArchiveReader()
    keys, crop_boxes = rows["key"].to_list(), rows["crop_box"].to_list()
    outcomes: list[Fetched | None] = [None] * rows.height
    try:
        for image_path, indices in _rows_by_image(rows["image_path"].to_list()).items():
            boxes = [crop_boxes[i] for i in indices]
            for i, fetched in zip(indices, _read_image(reader, resizer, image_path, boxes), strict=True):
                outcomes[i] = fetched
                if on_image is not None:
                    on_image(keys[i], fetched)
    finally:
        reader.close()
    return dict(zip(keys, outcomes, strict=True))  # row order, as row by row gave it


def _rows_by_image(image_paths: list[str]) -> dict[str, list[int]]:
    """Row indices of each image, images in the order they first appear."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(image_paths):
        groups.setdefault(path, []).append(i)
    return groups


def _read_image(reader: ArchiveReader, resizer: GuardedResizer, image_path: str, crop_boxes: list) -> list[Fetched]:
    """Each region's outcome, from one read of the image."""
    try:
        data = reader.read(image_path)
    except (OSError, ValueError):
        # Each row reads and fails on its own, as row by row did: a transient error stays one row's.
        return [_read_one(reader, resizer, image_path, box) for box in crop_boxes]
    return [_fetched(outcome) for outcome in resizer.resize_regions(data, crop_boxes)]


def _read_one(reader: ArchiveReader, resizer: GuardedResizer, image_path: str, crop_box) -> Fetched:
    """One row alone: its own read and decode (the baseline `read_local` must match, output for output)."""
    try:
        data = reader.read(image_path)
    except FileNotFoundError as err:
        return Fetched(reason="image_missing", error=str(err))
    except (OSError, ValueError) as err:
        return Fetched(reason="archive_error", error=f"{type(err).__name__}: {err}")
    return _fetched(resizer.resize_bytes(data, crop_box))


def _fetched(outcome: tuple) -> Fetched:
    img, width, height, original_width, original_height, error = outcome
    if error is not None:
        return Fetched(reason=reason_code(error), error=error)
    return Fetched(img, None, None, width, height, original_width, original_height)
