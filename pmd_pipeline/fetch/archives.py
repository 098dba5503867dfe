"""Read images of local sources: plain files, or members of zip/tar archives named `archive::member`.

The archive may be a local file or an object in a bucket: a zip's members are then read by range (its
central directory, then each member's bytes), never by downloading the whole archive to each node. The
archives are opened by pmd_pipeline.archive_members, the one opener the metadata readers use too.
"""

from __future__ import annotations

from pmd_pipeline.archive_members import SEPARATOR, open_archive, read_member
from pmd_pipeline.storage import as_path

ARCHIVE_SEPARATOR = SEPARATOR


class ArchiveReader:
    """Keeps archives open across reads: opening a 13 GB zip once per image would dominate the run."""

    def __init__(self) -> None:
        self._open: dict = {}
        self._files: list = []

    def read(self, image_path: str) -> bytes:
        """The member's bytes; raises FileNotFoundError (missing) or ValueError (unreadable) for one image.

        A damaged member (a bad CRC, a broken compressed stream) or an archive that cannot be opened is a
        ValueError: that image's failure (`archive_error`), never the shard's."""
        if ARCHIVE_SEPARATOR not in image_path:
            return as_path(image_path).read_bytes()
        archive_path, member = image_path.split(ARCHIVE_SEPARATOR, 1)
        return read_member(self._archive(archive_path), archive_path, member)

    def _archive(self, path: str):
        if path not in self._open:
            f, archive = open_archive(path)
            self._files.append(f)
            self._open[path] = archive
        return self._open[path]

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        for f in self._files:
            f.close()
        self._open.clear()
        self._files.clear()
