"""The one opener of `archive::member`, for the image readers and the metadata readers alike.

A member is named `<archive>::<member>`: `train2014.zip::train2014/COCO_train2014_000000000009.jpg`,
`caption_datasets.zip::dataset_coco.json`, `sbu-captions-all.tar.gz::sbu-captions-all.json`. A metadata
entry may also name members by a glob, `redcaps_v1.0_annotations.zip::annotations/*.json`: every matching
member, sorted by name, each read as a metadata file of its own. The archive is a local file or an object
in a bucket (any fsspec URL, through pmd_pipeline.storage):

- a zip is read by range: its central directory, then the member's bytes, never the whole archive;
- a tar (plain, .gz, .bz2, .xz) is read front to back as a stream (`r|*`): a compressed tar cannot seek, so
  finding a member reads the archive up to it (a glob over a tar's members reads it once to list them, then
  up to each member; the published tars hold one metadata file). Image tars are opened for random access.

A member is a stream (zipfile's member open(), tarfile's extractfile on a stream), never read whole: Visual
Genome's region_descriptions.json is 700 MB unzipped. A damaged member raises one of DAMAGED part-way
through, after the bytes before the damage were read; a zip's CRC is checked when its last byte is read.

This module sits in the storage layer (it imports the storage layer and the error type, nothing else), so
sources and stages both use it.
"""

from __future__ import annotations

import fnmatch
import io
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from pmd_pipeline.errors import PmdError
from pmd_pipeline.storage import as_path

SEPARATOR = "::"
GLOB_CHARS = "*?["
# What a damaged archive or member raises while it is read: a bad CRC or a broken zip record, a tar's damaged
# blocks or compressed stream, a damaged deflate stream, data that ends too early.
DAMAGED = (zipfile.BadZipFile, tarfile.ReadError, zlib.error, EOFError)
STREAM_BUFFER = 1 << 20
PIECE = 64 << 10  # a member is read this much at a time (see _OwnedStream)
HINT_NAMES = 3


class MissingMember(FileNotFoundError):
    """The archive is there but has no such member (or it is not a regular file); `hint` says what it has."""

    def __init__(self, archive: str, member: str, hint: str) -> None:
        super().__init__(f"no member {member} in {archive}" + (f" ({hint})" if hint else ""))
        self.hint = hint


def split_member(value: str) -> tuple[str, str] | None:
    """(archive, member) of `archive::member`, else None (a plain file)."""
    archive, sep, member = value.partition(SEPARATOR)
    return (archive, member) if sep and archive and member else None


def is_glob(member: str) -> bool:
    return any(c in member for c in GLOB_CHARS)


def matches(name: str, pattern: str) -> bool:
    """A glob over member names, one path segment per segment: `annotations/*.json` matches no `a/b/c.json`."""
    names, patterns = name.split("/"), pattern.split("/")
    return len(names) == len(patterns) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, patterns, strict=True))


@dataclass(frozen=True)
class MemberPath:
    """A member of an archive, standing in for a metadata file's Path: `name`, `stem`, `suffix`, `open("rb")`.

    Its str() is `archive::member`, so reject logs and errors name it the way the config does. It has no
    `__fspath__` on purpose: open() and the OS cannot treat it as a local file by mistake."""

    archive: str
    member: str

    def __str__(self) -> str:
        return f"{self.archive}{SEPARATOR}{self.member}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.member).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.member).suffix

    def open(self, mode: str = "rb") -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"{self}: an archive member is read only as bytes ('rb'), not {mode!r}")
        return open_member(self.archive, self.member)

    def is_file(self) -> bool:
        try:
            with self.open():
                return True
        except FileNotFoundError:  # the archive, or the member
            return False

    exists = is_file


def metadata_path(value: str | Path) -> Path | MemberPath:
    """A config's metadata string as what reads it: a MemberPath for `archive::member`, else a storage path."""
    if isinstance(value, str) and (parts := split_member(value)):
        return MemberPath(*parts)
    return as_path(value)


def metadata_files(entry: str, who: str) -> list[Path | MemberPath]:
    """The files one metadata entry names: a file, an archive member, or every member a glob matches (sorted).

    A missing file, archive or member, a glob that matches nothing and an unreadable archive are one-line
    PmdErrors that begin with `who` ("source coco") and name the entry."""
    parts = split_member(entry) if isinstance(entry, str) else None
    if parts is None:
        path = as_path(entry)
        if not path.is_file():
            raise PmdError(f"{who}: metadata file not found: {path}")
        return [path]
    archive, member = parts
    if not as_path(archive).is_file():
        raise PmdError(f"{who}: metadata archive not found: {archive} (for {entry})")
    try:
        if is_glob(member):
            found = [MemberPath(archive, name) for name in sorted(member_names(archive)) if matches(name, member)]
            if not found:
                raise PmdError(f"{who}: no member of {archive} matches {member}")
            return found
        with open_member(archive, member):
            pass
        return [MemberPath(archive, member)]
    except MissingMember as err:
        raise PmdError(f"{who}: metadata file not found: {entry} ({err.hint})") from None
    except (*DAMAGED, tarfile.TarError) as err:
        raise PmdError(f"{who}: {archive} is not a readable zip or tar archive ({_said(err)})") from None
    except OSError as err:
        raise PmdError(f"{who}: cannot read {archive} ({_said(err)})") from None


def member_names(archive: str) -> list[str]:
    """The names of the archive's regular files, in the archive's order (a tar is read through once)."""
    with as_path(archive).open("rb") as f:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                return [info.filename for info in z.infolist() if not info.is_dir()]
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            return [_tar_name(info.name) for info in tar if info.isfile()]


def open_member(archive: str, member: str) -> io.BufferedReader:
    """A member's bytes as a stream; closing it closes the archive. FileNotFoundError names what is missing."""
    location = as_path(archive)
    if not location.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    f = location.open("rb")  # seekable, locally and on object stores (range requests)
    opened = None
    try:
        if zipfile.is_zipfile(f):
            opened = zipfile.ZipFile(f)
            stream = opened.open(_zip_member(opened, archive, member))
        else:
            f.seek(0)  # is_zipfile read from it
            opened = tarfile.open(fileobj=f, mode="r|*")
            stream = _tar_stream(opened, archive, member)
    except BaseException:
        if opened is not None:
            opened.close()
        f.close()
        raise
    return io.BufferedReader(_OwnedStream(stream, opened, f), buffer_size=STREAM_BUFFER)


def open_archive(path: str) -> tuple[IO[bytes], zipfile.ZipFile | tarfile.TarFile]:
    """(file, archive) opened for random access, for reading one member after another in any order (images).

    FileNotFoundError when the archive is missing; ValueError when it is not a readable zip or tar."""
    location = as_path(path)
    if not location.exists():
        raise FileNotFoundError(f"archive not found: {path}")
    f = location.open("rb")  # seekable, locally and on object stores (range requests)
    try:
        if zipfile.is_zipfile(f):
            return f, zipfile.ZipFile(f)
        f.seek(0)
        return f, tarfile.open(fileobj=f)
    except (*DAMAGED, tarfile.TarError) as err:
        f.close()
        raise ValueError(f"{path} is not a readable zip or tar archive ({_said(err)})") from None
    except BaseException:
        f.close()
        raise


def read_member(archive: zipfile.ZipFile | tarfile.TarFile, archive_path: str, member: str) -> bytes:
    """A member's bytes from an archive open for random access (an image: small by nature).

    MissingMember when it has no such member; ValueError when the member is damaged (a bad CRC, a broken
    compressed stream) or not a regular file: one image's failure, never the reader's."""
    try:
        if isinstance(archive, zipfile.ZipFile):
            return archive.read(_zip_member(archive, archive_path, member, hint=False))
        try:
            info = archive.getmember(member)
        except KeyError:
            raise MissingMember(archive_path, member, "") from None
        f = archive.extractfile(info)
        if f is None:
            raise ValueError(f"{member} in {archive_path} is not a regular file")
        return f.read()
    except DAMAGED as err:
        raise ValueError(f"damaged member {member} in {archive_path} ({_said(err)})") from None


def _zip_member(z: zipfile.ZipFile, archive: str, member: str, hint: bool = True) -> zipfile.ZipInfo:
    try:
        info = z.getinfo(member)
    except KeyError:
        # No hint for images: listing a 13 GB zip's 80k names for every missing image would cost more than the read.
        raise MissingMember(archive, member, _hint(archive, member, z.namelist()) if hint else "") from None
    if info.is_dir():
        raise MissingMember(archive, member, "it is a folder")
    return info


def _tar_stream(tar: tarfile.TarFile, archive: str, member: str) -> IO[bytes]:
    wanted, seen = _tar_name(member), []
    for info in tar:
        name = _tar_name(info.name)
        if name == wanted:
            if not info.isfile():
                raise MissingMember(archive, member, "it is not a regular file")
            return tar.extractfile(info)
        seen.append(name)
    raise MissingMember(archive, member, _hint(archive, member, seen))


def _tar_name(name: str) -> str:
    """A tar member's name as written in a config: tars made with `tar -C dir .` prefix every name with ./"""
    while name.startswith("./"):
        name = name[2:]
    return name


def _hint(archive: str, member: str, names: list[str]) -> str:
    """What the archive has instead: a member of the same file name in another folder, else its first names."""
    same = [n for n in names if PurePosixPath(n).name == PurePosixPath(member).name]
    if same:
        return f"the archive has no member {member}; did you mean {archive}{SEPARATOR}{same[0]}?"
    shown = ", ".join(names[:HINT_NAMES]) + (", ..." if len(names) > HINT_NAMES else "")
    return f"the archive has no member {member}; its {len(names)} members: {shown or 'none'}"


def _said(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


class _OwnedStream(io.RawIOBase):
    """A member's stream that closes its archive and the archive's file when it is closed.

    Read in pieces of at most PIECE bytes, so the damage a read meets costs that piece, not a whole buffer
    (a zip checks its CRC as its last piece is read); and the damage is raised again on every later read:
    the member's own stream would report a plain end after it, and a reader would take that for the end."""

    def __init__(self, stream: IO[bytes], *owners) -> None:
        self._stream, self._owners, self._damage = stream, owners, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._damage is not None:
            raise self._damage
        try:
            data = self._stream.read(min(len(buffer), PIECE))
        except DAMAGED as err:
            self._damage = err
            raise
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            for thing in (self._stream, *self._owners):
                thing.close()
        finally:
            super().close()
