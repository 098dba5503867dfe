"""Read images of local sources: plain files, or members of zip/tar archives named `archive::member`.

The archive may be a local file or an object in a bucket: a zip's members are then read by range (its
central directory, then each member's bytes), never by downloading the whole archive to each node.
"""

from __future__ import annotations

import tarfile
import zipfile

from pmd_pipeline.storage import as_path

ARCHIVE_SEPARATOR = "::"


class ArchiveReader:
    """Keeps archives open across reads: opening a 13 GB zip once per image would dominate the run."""

    def __init__(self) -> None:
        self._open: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}
        self._files: list = []

    def read(self, image_path: str) -> bytes:
        """The member's bytes; raises FileNotFoundError (missing) or ValueError (unreadable) for one image."""
        if ARCHIVE_SEPARATOR not in image_path:
            return as_path(image_path).read_bytes()
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
            location = as_path(path)
            if not location.exists():
                raise FileNotFoundError(f"archive not found: {path}")
            f = location.open("rb")  # seekable, locally and on object stores (range requests)
            self._files.append(f)
            self._open[path] = zipfile.ZipFile(f) if zipfile.is_zipfile(f) else tarfile.open(fileobj=_rewound(f))
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
        for f in self._files:
            f.close()
        self._open.clear()
        self._files.clear()


def _rewound(f):
    f.seek(0)  # zipfile.is_zipfile read from it
    return f
