"""Pieces of the spine on their own: mirrors, metadata URLs, archives, reason codes, failed-shard handling."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from pmd_pipeline.build import build
from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.archives import ArchiveReader
from pmd_pipeline.fetch.metadata import localize_metadata
from pmd_pipeline.fetch.mirror import StaticServer, rewrite_url, use_mirror
from pmd_pipeline.fetch.reasons import reason_code


def test_mirror_rewrites_scheme_and_host_into_a_path():
    assert (
        rewrite_url("https://img.example.com/a/b.jpg?x=1", "http://127.0.0.1:9/")
        == "http://127.0.0.1:9/img.example.com/a/b.jpg?x=1"
    )
    assert rewrite_url("http://h/p.jpg", "") == "http://h/p.jpg"


@pytest.mark.parametrize(
    "error, code",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("<urlopen error timed out>", "timeout"),
        ("Image decoding error", "decode_error"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        (None, "unknown_error"),
        ("something new", "download_error"),
    ],
)
def test_reason_codes(error, code):
    assert reason_code(error) == code


def test_archive_reader_reads_zip_and_tar_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("train2014/x.jpg", b"zip bytes")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("flickr30k-images/1.jpg")
        info.size = 9
        t.addfile(info, io.BytesIO(b"tar bytes"))
    (tmp_path / "plain.jpg").write_bytes(b"file bytes")
    reader = ArchiveReader()
    assert reader.read(f"{tmp_path}/a.zip::train2014/x.jpg") == b"zip bytes"
    assert reader.read(f"{tmp_path}/b.tar.gz::flickr30k-images/1.jpg") == b"tar bytes"
    assert reader.read(str(tmp_path / "plain.jpg")) == b"file bytes"
    with pytest.raises(FileNotFoundError):
        reader.read(f"{tmp_path}/a.zip::train2014/missing.jpg")
    reader.close()


def test_metadata_urls_are_downloaded_once_through_the_mirror(tmp_path):
    (tmp_path / "web" / "data.example").mkdir(parents=True)
    (tmp_path / "web" / "data.example" / "cc.tsv").write_text("a cat on a mat\thttp://x/1.jpg\n")
    cfg = BuildConfig(out=str(tmp_path / "out"))
    source = SourceConfig("conceptual_captions", metadata=["https://data.example/cc.tsv"])
    with StaticServer(tmp_path / "web") as server:
        use_mirror(cfg.fetch, server.url)
        local = localize_metadata(cfg, source)
    assert open(local.metadata[0]).read().startswith("a cat on a mat")
    assert localize_metadata(cfg, source).metadata == local.metadata  # server gone: the copy is reused
    with pytest.raises(PmdError, match="could not download nope.tsv from .*127.0.0.1:9/nope.tsv"):
        localize_metadata(cfg, SourceConfig("conceptual_captions", metadata=["http://127.0.0.1:9/nope.tsv"]))


def test_a_failing_shard_is_retried_then_reported_and_the_rest_finish(ray_session, tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("".join(f"caption number {i} here\tftp://x/{i}.jpg\n" for i in range(6)))
    cfg = BuildConfig(
        out=str(tmp_path / "out"), shard_size=2, sources=[SourceConfig("conceptual_captions", metadata=[str(tsv)])]
    )
    cfg.run.shard_retries = 1
    build(cfg)  # plans and builds 3 shards (every image fails: ftp is not fetched)
    broken = tmp_path / "out" / "conceptual_captions"
    for f in broken.glob("00001*"):
        f.unlink()
    (tmp_path / "out" / "_plan" / "conceptual_captions" / "00001.parquet").write_bytes(b"not parquet")
    result = build(cfg)
    assert result.shards_failed == [str(broken / "00001.tar")]
    assert result.shards_skipped == 2 and result.manifest is None
