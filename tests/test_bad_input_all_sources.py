"""Every source parser meets broken copies of its own raw files (the embedded bundle's, which are in each
source's real format): truncated, invalid UTF-8, NUL bytes, a very long line, an empty file.

The contract: the reader never crashes with anything but a one-line PmdError naming the source (a source
whose whole input is unreadable fails alone), and nothing is lost silently: whatever it cannot read is
in the reject log with its file and line, and every record before the damage is still read.
"""

from __future__ import annotations

import dataclasses

import pytest

from pmd_pipeline.embedded import default_config, materialize, served_locally
from pmd_pipeline.errors import PmdError
from sources import get_source
from sources.base import RejectLog, require_files


def damage_truncate(data: bytes) -> bytes:
    return data[: int(len(data) * 0.6)]


def damage_invalid_utf8(data: bytes) -> bytes:
    middle = data.find(b"\n", len(data) // 2)
    middle = len(data) // 2 if middle < 0 else middle
    return data[:middle] + b"\xff\xfe caf\xe9 " + data[middle:]


def damage_nul(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\x00" + data[middle:]


def damage_long_line(data: bytes) -> bytes:
    return data + b"\n" + b"x" * 20_000_000 + b"\n"  # over every reader's line limit (1 MB, 16 MB)


def damage_empty(data: bytes) -> bytes:
    return b""


DAMAGE = {
    f.__name__.removeprefix("damage_"): f
    for f in (damage_truncate, damage_invalid_utf8, damage_nul, damage_long_line, damage_empty)
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The embedded default's sources reading their files as published (archives in place), from disk."""
    out = tmp_path_factory.mktemp("bundle") / "out"
    root = materialize(str(out))
    cfg = default_config(str(out))
    cfg.sources = [served_locally(s, root) for s in cfg.sources]
    return cfg


def source_names() -> list[str]:
    return [s.name for s in default_config("/x").sources if s.metadata]


def read_all(source_cfg) -> tuple[int, RejectLog]:
    rejects = RejectLog()
    rows = sum(batch.height for batch in get_source(source_cfg.name).read(source_cfg, rejects))
    return rows, rejects


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", source_names())
def test_a_damaged_raw_file_is_counted_kept_aside_or_fails_the_source_clearly(bundle, tmp_path, name, damage):
    source_cfg = next(s for s in bundle.sources if s.name == name)
    good_rows, good_rejects = read_all(source_cfg)
    target, *others = require_files(source_cfg)  # a member of an archive is damaged as a plain copy of it
    broken = tmp_path / target.name
    with target.open("rb") as f:
        broken.write_bytes(DAMAGE[damage](f.read()))
    damaged_cfg = dataclasses.replace(source_cfg, metadata=[str(broken), *map(str, others)])
    try:
        rows, rejects = read_all(damaged_cfg)
    except PmdError as err:  # the whole input is unreadable: the source fails with a clear one-line message
        message = str(err)
        assert message.startswith(f"source {name}") and "\n" not in message, message
        return
    if damage == "long_line":
        assert rows == good_rows and len(rejects) == len(good_rejects) + 1
        reasons = {r.reason for r in rejects.rejects} - {r.reason for r in good_rejects.rejects}
        assert reasons <= {
            "line_too_long",
            "wrong_column_count",
            "csv_error",
            "trailing_data",
            "corrupt_compressed_stream",
        }
    elif damage == "empty":
        assert rows <= good_rows  # an empty file is no records, not an error
    else:
        new = rejects.rejects[len(good_rejects) :] if len(rejects) > len(good_rejects) else []
        assert rows < good_rows or new or rows == good_rows, "records vanished without a reject"
        if rows < good_rows:
            lost = good_rows - rows
            assert new or damage == "truncate", f"{lost} records lost without a reject"
        for reject in rejects.rejects:
            assert reject.file and reject.line >= 0 and reject.reason
