"""Read images of local sources: plain files, or members of zip/tar archives named `archive::member`."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

ARCHIVE_SEPARATOR = "::"


class ArchiveReader:
    """Keeps archives open across reads: opening a 13 GB zip once per image would dominate the run."""

    def __init__(self) -> None:
        self._open: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}

    def read(self, image_path: str) -> bytes:
        """The member's bytes; raises FileNotFoundError (missing) or ValueError (unreadable) for one image."""
        if ARCHIVE_SEPARATOR not in image_path:
            return Path(image_path).read_bytes()
        archive_path, member = image_path.split(ARCHIVE_SEPARATOR, 1)
        archive = self._archive(archive_path)
        if isinstance(archive, zipfile.ZipFile):
            try:
                return archive.read(member)
            except KeyError:
                raise FileNotFoundError(f"no member {member} in {archive_path}") from None
        return self._read_tar_member(archive, archive_path, member)

    def _archive(self, path: str):
        if path not in self._open:
            if not Path(path).exists():
                raise FileNotFoundError(f"archive not found: {path}")
            self._open[path] = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else tarfile.open(path)
        return self._open[path]

    @staticmethod
    def _read_tar_member(archive: tarfile.TarFile, archive_path: str, member: str) -> bytes:
        try:
            info = archive.getmember(member)
        except KeyError:
            raise FileNotFoundError(f"no member {member} in {archive_path}") from None
        f = archive.extractfile(info)
        if f is None:
            raise ValueError(f"{member} in {archive_path} is not a regular file")
        return f.read()

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        self._open.clear()
