"""Readers shared by sources: streaming JSON arrays, gzip-aware opening, whole small JSON documents.

A metadata file is a local path, an object in a bucket, or a member of an archive read in place
(`caption_datasets.zip::dataset_coco.json`, a MemberPath from pmd_pipeline.archive_members): all three are
opened by open_binary and streamed, and reject logs name a member `archive::member`.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from pmd_pipeline.archive_members import DAMAGED, MemberPath, metadata_path
from pmd_pipeline.errors import PmdError
from sources.base import RejectLog

CHUNK_CHARS = 1 << 20
# What a damaged compressed stream raises part-way through: a gzip's, a zip member's (a bad CRC, a broken deflate
# stream), a tar's. The records before it are kept, the rest is one reject.
CORRUPT_STREAM = (EOFError, zlib.error, gzip.BadGzipFile, *DAMAGED)
WHOLE_FILE = 0  # the line of a reject about a whole document (a JSON file read at once)
UTF8_BOM = b"\xef\xbb\xbf"


def numbered_lines(path: Path | MemberPath, rejects: RejectLog) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a possibly gzipped file; a corrupt stream ends it with a reject."""
    line_no = 0
    try:
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw
    except CORRUPT_STREAM as err:
        rejects.add(path, line_no + 1, "corrupt_compressed_stream", f"{type(err).__name__}: {err}")


def open_binary(path: str | Path | MemberPath) -> io.BufferedIOBase:
    """The file's bytes, gunzipped when it is gzip (by its magic bytes, not its name: real dumps lie).

    An archive member (`archive::member`) is streamed out of its archive, never read whole, and gunzipped
    the same way when it is itself gzip. A UTF-8 byte-order mark (Windows editors and exports write one) is
    skipped here, for every reader: kept, it became part of the first caption or URL, or hid a JSON
    array's `[` and a TSV header.
    """
    path = metadata_path(path)
    try:
        raw = path.open("rb")
    except DAMAGED as err:  # an archive whose directory or headers are damaged: nothing of the member can be read
        raise PmdError(f"{path} cannot be read: a damaged archive ({type(err).__name__}: {err})") from None
    if not isinstance(raw, io.BufferedReader):  # a bucket's file object: peek needs a buffer
        raw = io.BufferedReader(raw, buffer_size=1 << 20)
    stream = raw
    try:
        magic = raw.peek(2)[:2]
    except CORRUPT_STREAM:  # a damaged member: the reader's first read fails again, where it is reported as such
        magic = b""
    if magic == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=raw)
        stream.myfileobj = raw  # as gzip.open does: closing the stream closes the file too
    try:
        if stream.peek(len(UTF8_BOM))[: len(UTF8_BOM)] == UTF8_BOM:
            stream.read(len(UTF8_BOM))
    except CORRUPT_STREAM:
        pass  # a damaged gzip: the reader's first read fails again, where it is reported as such
    return stream


def load_json(path: Path | MemberPath, source: str, rejects: RejectLog | None = None):
    """A whole JSON document (files that are small by design: image lists, split files, annotation files).

    A damaged compressed stream (a gzip, a zip member with a bad CRC, a tar) is one reject for the whole
    file (line 0) and None when `rejects` is given: a source of many such files (RedCaps' annotations, two
    COCO caption files) keeps the others. Without it (a lookup table: image_data.json, the Karpathy split
    file) the source cannot go on and fails with one line."""
    try:
        with open_binary(path) as f:
            return json.load(f)
    except CORRUPT_STREAM as err:
        said = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if rejects is None:
            raise PmdError(f"source {source}: {path} is damaged ({said})") from None
        rejects.add(path, WHOLE_FILE, "corrupt_compressed_stream", said)
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise PmdError(f"source {source}: {path} is not valid JSON ({err})") from None


def iter_json_array(path: Path | MemberPath, source: str, rejects: RejectLog) -> Iterator[tuple[int, object]]:
    """Yield (1-based index, element) of a top-level JSON array without loading the whole file.

    Multi-GB arrays (Visual Genome's region_descriptions.json) are decoded one element at a time.
    A truncated or corrupt tail is one reject (with the element's index) and the end of the file.
    """
    decoder = json.JSONDecoder()
    with open_binary(path) as raw:
        reader = _Buffered(io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
        try:
            first = reader.next_char()
        except (UnicodeDecodeError, *CORRUPT_STREAM) as err:
            raise PmdError(f"source {source}: {path} cannot be read as UTF-8 JSON ({type(err).__name__})") from None
        if first != "[":
            raise PmdError(f"source {source}: {path} does not start with a JSON array")
        reader.position += 1
        index = 0
        while True:
            try:
                char = reader.next_char()
            except (UnicodeDecodeError, *CORRUPT_STREAM) as err:
                rejects.add(
                    path,
                    index + 1,
                    "invalid_utf8" if isinstance(err, UnicodeDecodeError) else "corrupt_compressed_stream",
                    str(err)[:200],
                )
                return
            if char == "]":
                reader.position += 1
                if reader.next_char():
                    rejects.add(
                        path, index + 1, "trailing_data", reader.buffer[reader.position : reader.position + 200]
                    )
                return
            if char == "," and index:
                reader.position += 1
                continue
            if char == "":
                rejects.add(path, index + 1, "truncated_json", reader.buffer[-200:])
                return
            try:
                element = reader.decode(decoder)
            except (UnicodeDecodeError, *CORRUPT_STREAM) as err:
                reason = "invalid_utf8" if isinstance(err, UnicodeDecodeError) else "corrupt_compressed_stream"
                rejects.add(path, index + 1, reason, str(err)[:200])
                return
            index += 1
            if element is _TRUNCATED:
                rejects.add(path, index, "truncated_json", reader.buffer[reader.position : reader.position + 200])
                return
            yield index, element


class _Buffered:
    """A text buffer over a stream; the consumed part is dropped only when more text is read."""

    def __init__(self, text):
        self.text, self.buffer, self.position = text, "", 0

    def _more(self) -> bool:
        more = self.text.read(CHUNK_CHARS)
        self.buffer, self.position = self.buffer[self.position :] + more, 0
        return bool(more)

    def next_char(self) -> str:
        """The next non-space character without consuming it ("" at the end)."""
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position] in " \t\r\n":
                self.position += 1
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if not self._more():
                return ""

    def decode(self, decoder):
        while True:
            try:
                element, self.position = decoder.raw_decode(self.buffer, self.position)
                return element
            except json.JSONDecodeError:
                if not self._more():
                    return _TRUNCATED


_TRUNCATED = object()
