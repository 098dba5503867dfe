"""Downloads of the files a config names by URL: Ray tasks in parallel, resumed with HTTP Range (a dropped
connection, a killed process), verified (size, sha256/md5), through the mirror, into a folder or a bucket.

Every server here is real: the project's mirror server (with Range) on 127.0.0.1, with faults injected per
path (tests/range_web.py), and moto's S3 server for the bucket."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pmd_pipeline.build import build
from pmd_pipeline.config import BuildConfig, SourceConfig, TokenizeConfig
from pmd_pipeline.config_file import config_from_dict
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch import downloads
from pmd_pipeline.fetch.downloads import (
    Download,
    download_all,
    download_file,
    downloads_of,
    localized,
    relative_target,
    split_member,
)
from pmd_pipeline.fetch.metadata import localize_metadata
from pmd_pipeline.fetch.mirror import StaticServer, use_mirror
from pmd_pipeline.progress import Snapshot, StageCounts, plain_line, summary_lines
from tests.range_web import RangeWeb
from tests.s3_server import list_objects, s3_server

ROOT = Path(__file__).resolve().parents[1]


def blob(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset (a resume at the wrong offset cannot give the same bytes)."""
    out, block, i = bytearray(), b"", 0
    while len(out) < n:
        block = hashlib.sha256(block + f"{seed}:{i}".encode()).digest()
        out += block
        i += 1
    return bytes(out[:n])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def web_config(out: Path, web: RangeWeb, **fetch) -> BuildConfig:
    cfg = BuildConfig(out=str(out), tokenize=TokenizeConfig(enabled=False))
    use_mirror(cfg.fetch, web.url)  # every https://host/path comes from the test server, as --mirror does
    cfg.fetch.backoff_s = 0.05
    cfg.fetch.timeout_s = 5.0
    for key, value in fetch.items():
        setattr(cfg.fetch, key, value)
    return cfg


def job_for(cfg: BuildConfig, url: str, expected: str = "") -> Download:
    return Download(url, str(relative_target(url)), expected, ("coco",))


@pytest.fixture
def web(tmp_path):
    with RangeWeb(tmp_path / "web") as server:
        yield server


# --- where files go, and what the plan reads ---


def test_archive_members_keep_their_member_and_urls_map_into_out(tmp_path):
    assert split_member("https://h.example/a/caption_datasets.zip::dataset_coco.json") == (
        "https://h.example/a/caption_datasets.zip",
        "dataset_coco.json",
    )
    assert split_member("http://[::1]:8000/x.json") == ("http://[::1]:8000/x.json", None)  # an IPv6 host
    assert split_member("http://[::1]:8000/x.zip::a/b.json") == ("http://[::1]:8000/x.zip", "a/b.json")
    assert str(relative_target("https://images.cocodataset.org/zips/train2014.zip")) == (
        "_downloads/images.cocodataset.org/zips/train2014.zip"
    )
    odd = relative_target("https://h.example/../a b/get?file=x.tsv.gz")
    assert odd.parts[:2] == ("_downloads", "h.example") and ".." not in odd.parts and odd.parent.name.startswith("~")
    assert relative_target("https://h.example/get?file=1") != relative_target("https://h.example/get?file=2")

    cfg = BuildConfig(out=str(tmp_path / "out"))
    source = SourceConfig(
        "coco",
        metadata=["https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip::dataset_coco.json"],
        images={"train2014": "http://images.cocodataset.org/zips/train2014.zip", "val2014": "/data/val2014.zip"},
    )
    local = localized(cfg, source)
    out = tmp_path / "out" / "_downloads"
    assert local.metadata == [
        f"{out}/cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip::dataset_coco.json"
    ]
    assert local.images == {
        "train2014": f"{out}/images.cocodataset.org/zips/train2014.zip",
        "val2014": "/data/val2014.zip",
    }
    # One download per file, however many sources and entries name it.
    other = SourceConfig("localized_narratives__coco", images={"train2014": source.images["train2014"]})
    jobs = downloads_of(dataclasses.replace(cfg, sources=[source, other]))
    assert [(j.name, j.sources) for j in jobs] == [
        ("caption_datasets.zip", ("coco",)),
        ("train2014.zip", ("coco", "localized_narratives__coco")),
    ]


def test_checksums_are_checked_with_the_config(tmp_path):
    def load(checksums, metadata=("https://h.example/cc.tsv",)):
        raw = {"sources": {"conceptual_captions": {"metadata": list(metadata), "checksums": checksums}}}
        return config_from_dict(raw, base_dir=tmp_path)

    good = "sha256:" + "ab" * 32
    assert load({"cc.tsv": good.upper().replace("SHA256", "sha256")}).sources[0].checksums
    assert load({"https://h.example/cc.tsv": "md5:" + "0" * 32}).sources[0].checksums
    with pytest.raises(PmdError, match=r'checksums: "cc.tsv" = "sha1:abc" is not "sha256:<64 hex digits>"'):
        load({"cc.tsv": "sha1:abc"})
    with pytest.raises(PmdError, match=r'"cc.tvs" is not a file this source downloads \(cc.tsv\)'):
        load({"cc.tvs": good})
    with pytest.raises(PmdError, match=r"download_parallelism = 0 is not allowed"):
        config_from_dict({"fetch": {"download_parallelism": 0}}, base_dir=tmp_path)


def test_checksums_do_not_change_the_outputs_hash(tmp_path):
    from pmd_pipeline.output import content_hash

    cfg = BuildConfig(sources=[SourceConfig("conceptual_captions", metadata=["https://h.example/cc.tsv"])])
    before = content_hash(cfg)
    cfg.sources[0].checksums = {"cc.tsv": "md5:" + "0" * 32}
    assert content_hash(cfg) == before


# --- the mirror server's ranges (what every resume below relies on) ---


def test_the_mirror_server_answers_byte_ranges(tmp_path):
    (tmp_path / "f.bin").write_bytes(blob(1000))
    with StaticServer(tmp_path) as server:

        def get(headers):
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{server.url}/f.bin", headers=headers)) as r:
                    return r.status, r.headers, r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.headers, b""

        status, headers, body = get({})
        assert status == 200 and body == blob(1000) and headers["Accept-Ranges"] == "bytes"
        status, headers, body = get({"Range": "bytes=100-"})
        assert status == 206 and body == blob(1000)[100:] and headers["Content-Range"] == "bytes 100-999/1000"
        assert get({"Range": "bytes=10-19"})[2] == blob(1000)[10:20]
        status, headers, _ = get({"Range": "bytes=1000-"})
        assert status == 416 and headers["Content-Range"] == "bytes */1000"
        status, _, body = get({"Range": "bytes=100-", "If-Range": '"not-this-file"'})
        assert status == 200 and body == blob(1000), "If-Range that does not match: the whole file"
        validator = get({"Range": "bytes=0-0"})[1]["ETag"]
        assert get({"Range": "bytes=500-", "If-Range": validator})[0] == 206


# --- resumed, verified ---


def test_a_dropped_connection_is_resumed_from_where_it_broke(tmp_path, web):
    url, body = "https://data.example/cc/Train_GCC-training.tsv", blob(1_000_000)
    path = web.add(url, body)
    web.faults.drop_after[path] = 300_000  # the first response stops after 300,000 of 1,000,000 bytes
    cfg = web_config(tmp_path / "out", web)
    record = download_file(job_for(cfg, url, f"sha256:{sha256(body)}"), cfg.fetch, cfg.out)
    target = tmp_path / "out" / record["file"]
    assert target.read_bytes() == body
    assert web.faults.ranges(path) == [None, "bytes=300000-"]
    assert record["size"] == len(body) and record["sha256"] == sha256(body) and record["checked"].startswith("sha256:")
    assert record["md5"] == hashlib.md5(body).hexdigest()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".download.json"]
    again = download_file(job_for(cfg, url), cfg.fetch, cfg.out)
    assert again["downloaded"] is False and web.faults.hits(path) == 2, "a whole file is never fetched again"


def test_a_server_that_ignores_range_restarts_the_file_cleanly(tmp_path, web):
    url, body = "https://data.example/sbu/sbu-captions-all.tar.gz", blob(700_000, seed=1)
    path = web.add(url, body)
    web.faults.drop_after[path] = 250_000
    web.faults.ignore_range.add(path)  # 200 and the whole file, whatever the Range
    cfg = web_config(tmp_path / "out", web)
    record = download_file(job_for(cfg, url), cfg.fetch, cfg.out)
    assert (tmp_path / "out" / record["file"]).read_bytes() == body
    assert web.faults.ranges(path) == [None, "bytes=250000-"]  # asked to resume, got all of it, kept it once
    assert record["size"] == len(body) and record["sha256"] == sha256(body)


def test_a_checksum_mismatch_is_one_line_and_the_bad_file_is_kept_aside(tmp_path, web):
    url, body = "https://data.example/vg/region_descriptions.json.zip", blob(50_000, seed=2)
    web.add(url, body)
    cfg = web_config(tmp_path / "out", web)
    wrong = "0" * 64
    with pytest.raises(PmdError) as caught:
        download_file(job_for(cfg, url, f"sha256:{wrong}"), cfg.fetch, cfg.out)
    message = str(caught.value)
    assert "\n" not in message and "region_descriptions.json.zip" in message
    assert f"sha256 mismatch: expected {wrong}, got {sha256(body)}" in message
    target = tmp_path / "out" / relative_target(url)
    bad = target.with_name(target.name + ".bad")
    assert not target.exists() and bad.read_bytes() == body and str(bad) in message, "kept, named, never used"
    assert not target.with_name(target.name + ".download.json").exists()
    # md5 the same way; a file already there is checked against a checksum the config gained since.
    with pytest.raises(PmdError, match=f"md5 mismatch: expected {'1' * 32}, got {hashlib.md5(body).hexdigest()}"):
        download_file(job_for(cfg, url, "md5:" + "1" * 32), cfg.fetch, cfg.out)
    download_file(job_for(cfg, url), cfg.fetch, cfg.out)
    with pytest.raises(PmdError, match="sha256 mismatch"):
        download_file(job_for(cfg, url, f"sha256:{wrong}"), cfg.fetch, cfg.out)
    assert not target.exists() and bad.read_bytes() == body


def test_a_mirror_that_lacks_a_file_names_the_file_and_the_url_tried(tmp_path, web):
    cfg = web_config(tmp_path / "out", web)
    url = "https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv"
    with pytest.raises(PmdError) as caught:
        download_file(job_for(cfg, url), cfg.fetch, cfg.out)
    message = str(caught.value)
    tried = f"{web.url}/storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv"
    assert message.startswith(f"could not download GCC-1.1.0-Validation.tsv from {tried}: HTTP 404")
    assert f"(the mirror {web.url} has no copy of {url})" in message and "\n" not in message
    assert web.faults.hits("/storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv") == 1, (
        "a 404 is final"
    )
    nothing_there = dataclasses.replace(cfg.fetch, mirror="", retries=1, allowed_private_hosts=["127.0.0.1:9"])
    with pytest.raises(PmdError, match=r"could not download nope.tsv from http://127.0.0.1:9/nope.tsv: .*2 attempts"):
        download_file(job_for(cfg, "http://127.0.0.1:9/nope.tsv"), nothing_there, cfg.out)


def test_without_an_allowance_a_private_address_is_refused(tmp_path, web):
    url = "https://data.example/x.tsv"
    web.add(url, b"a\tb\n")
    cfg = web_config(tmp_path / "out", web)
    cfg.fetch.allowed_private_hosts = []  # the same guard as the images: --allow-host decides
    with pytest.raises(PmdError, match="blocked_address"):
        download_file(job_for(cfg, url), cfg.fetch, cfg.out)


KILLED_DOWNLOAD = """
import json, sys
from pmd_pipeline.config import FetchConfig
from pmd_pipeline.fetch.downloads import Download, download_file
job, fetch, out = json.loads(sys.argv[1])
download_file(Download(**job), FetchConfig(**fetch), out)
"""


def test_a_killed_download_resumes_from_its_partial_file(ray_session, tmp_path, web):
    url, body = "http://images.cocodataset.org/zips/train2014.zip", blob(6_000_000, seed=3)
    path = web.add(url, body)
    web.faults.seconds_per_chunk[path] = 0.02  # about 3 MB/s: the kill lands mid-file
    cfg = web_config(tmp_path / "out", web)
    source = SourceConfig("coco", images={"train2014": url}, checksums={"train2014.zip": f"sha256:{sha256(body)}"})
    cfg.sources = [source]
    (job,) = downloads_of(cfg)
    part = tmp_path / "out" / f"{job.path}.part"
    args = json.dumps([dataclasses.asdict(job), dataclasses.asdict(cfg.fetch), cfg.out])
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DOWNLOAD, args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group, killed whole
    )
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 1_000_000):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = part.stat().st_size
    assert 1_000_000 < kept < len(body), "killed mid-file, the partial file kept"
    web.faults.seconds_per_chunk.pop(path)
    assert download_all(cfg, [source]) == {}  # the build's way: a Ray task
    target = tmp_path / "out" / job.path
    assert target.read_bytes() == body and not part.exists()
    assert web.faults.ranges(path) == [None, f"bytes={kept}-"], "resumed at the partial offset, not from zero"
    record = json.loads(target.with_name(target.name + ".download.json").read_text())
    assert record["sha256"] == sha256(body) and record["size"] == len(body)


# --- as Ray tasks, in a build ---


def test_a_build_downloads_its_files_in_parallel_once_and_records_them(ray_session, tmp_path, web):
    texts = {
        f"https://corpus.example/books/part-{i}.txt": (f"paragraph {i} " * 40_000).encode() + b"\n\nthe end\n"
        for i in range(4)
    }
    paths = [web.add(url, body) for url, body in texts.items()]
    for path in paths:
        web.faults.seconds_per_chunk[path] = 0.15  # each about a second long: in parallel, they overlap
    web.faults.drop_after[paths[1]] = 70_000
    first = next(iter(texts))
    cfg = web_config(tmp_path / "out", web, download_parallelism=4)
    cfg.sources = [
        SourceConfig(
            "text_corpus",
            metadata=list(texts),
            checksums={"part-0.txt": f"sha256:{sha256(texts[first])}"},
            limit=20,  # the downloads are whole; the build itself is kept small
        )
    ]
    result = build(cfg)
    assert not result.failed, result.sources_failed
    assert web.faults.most_active >= 2, "several downloads in flight at once"
    recorded = result.manifest["downloads"]
    assert sorted(recorded) == sorted(texts)
    for url, body in texts.items():
        assert recorded[url]["size"] == len(body) and recorded[url]["sha256"] == sha256(body)
        assert (tmp_path / "out" / recorded[url]["file"]).read_bytes() == body
    assert recorded[first]["checked"] == f"sha256:{sha256(texts[first])}"
    assert result.manifest["config"]["sources"][0]["metadata"] == list(texts), "the manifest keeps the URLs"
    download = result.progress.stages["download"]
    assert download.shards == 4 and download.bytes >= sum(map(len, texts.values()))
    assert any(line.startswith("download: 4 files,") for line in summary_lines(result.progress))
    hits = web.faults.counts()

    again = build(cfg)
    assert not again.failed and web.faults.counts() == hits, "a re-run downloads nothing"
    assert again.manifest["downloads"] == recorded


def test_a_failed_download_fails_the_sources_that_need_it_alone(ray_session, tmp_path, web):
    url = "https://corpus.example/ok.txt"
    web.add(url, b"a paragraph of some words here\n")
    cfg = web_config(tmp_path / "out", web, retries=0)
    missing = "https://gcc.example/missing.tsv"
    sources = [
        SourceConfig("text_corpus", metadata=[url]),
        SourceConfig("conceptual_captions", metadata=[missing]),
        SourceConfig("conceptual_12m", metadata=[missing, url]),
    ]
    failed = download_all(cfg, sources)
    assert sorted(failed) == ["conceptual_12m", "conceptual_captions"]
    assert (
        failed["conceptual_captions"].startswith("could not download missing.tsv from ")
        and "HTTP 404" in failed["conceptual_captions"]
    )
    assert (tmp_path / "out" / relative_target(url)).exists(), "the others' files are downloaded all the same"


def test_image_archives_given_as_urls_build_the_same_shards(ray_session, tmp_path):
    """COCO's zips and Karpathy zip from a web server give the shards the same files on disk give."""
    from pmd_pipeline.embedded import default_config, materialize, mirror_place, served_locally
    from pmd_pipeline.output import claim_output

    local_cfg = default_config(str(tmp_path / "local"))
    local_cfg.tokenize.enabled = False
    root = materialize(str(tmp_path / "published"))
    coco = next(s for s in local_cfg.sources if s.name == "coco")
    local_cfg.sources = [served_locally(coco, root)]  # the published files, read from disk
    claim_output(local_cfg)
    assert not build(local_cfg).failed

    with RangeWeb(root / "mirror") as web:
        url_cfg = web_config(tmp_path / "remote", web)
        url_cfg.shard_size = local_cfg.shard_size
        base = f"{web.url}/"

        def served(entry: str) -> str:
            url, sep, member = entry.partition("::")
            return f"{base}{mirror_place(url)}{sep}{member}"

        url_cfg.sources = [
            SourceConfig(
                "coco",
                metadata=[served(m) for m in coco.metadata],
                images={role: served(url) for role, url in coco.images.items()},
            )
        ]
        url_cfg.fetch.mirror = ""  # the URLs name the server itself (allowed: use_mirror listed its port)
        result = build(url_cfg)
    assert not result.failed, result.sources_failed
    local_tars = {p.name: p.read_bytes() for p in (tmp_path / "local" / "coco").glob("*.tar")}
    url_tars = {p.name: p.read_bytes() for p in (tmp_path / "remote" / "coco").glob("*.tar")}
    assert url_tars == local_tars and url_tars
    names = [served(e).partition("::")[0] for e in [*coco.metadata, *coco.images.values()]]
    assert sorted(result.manifest["downloads"]) == sorted(names)


def test_localize_metadata_downloads_once_outside_a_build(tmp_path, web):
    url = "https://data.example/cc.tsv"
    path = web.add(url, b"a cat on a mat\thttp://x/1.jpg\n")
    cfg = web_config(tmp_path / "out", web)
    source = SourceConfig("conceptual_captions", metadata=[url])
    local = localize_metadata(cfg, source)
    assert Path(local.metadata[0]).read_text().startswith("a cat on a mat")
    assert localize_metadata(cfg, source).metadata == local.metadata and web.faults.hits(path) == 1
    assert localize_metadata(cfg, local) == local, "a localized config is left as it is"


# --- into a bucket ---


def test_into_a_bucket_the_object_appears_whole_and_once(tmp_path, web, monkeypatch):
    url, body = "https://data.example/wit/wit_v1.train.all-00000-of-00010.tsv.gz", blob(900_000, seed=4)
    path = web.add(url, body)
    web.faults.drop_after[path] = 400_000
    uploads = []
    real_upload = downloads.upload
    monkeypatch.setattr(
        downloads, "upload", lambda local, target: (uploads.append(str(target)), real_upload(local, target))
    )
    with s3_server(buckets=("bucket",)):
        cfg = web_config("s3://bucket/pmd", web)
        job = job_for(cfg, url, f"md5:{hashlib.md5(body).hexdigest()}")
        record = download_file(job, cfg.fetch, cfg.out)
        again = download_file(job, cfg.fetch, cfg.out)
        objects = list_objects("s3://bucket/pmd")
    assert web.faults.ranges(path) == [None, "bytes=400000-"]  # resumed in the local scratch .part
    assert sorted(objects) == [job.path, job.path + ".download.json"], "no .part or temporary object"
    assert objects[job.path] == body and json.loads(objects[job.path + ".download.json"])["sha256"] == sha256(body)
    assert uploads == [f"s3://bucket/pmd/{job.path}"], "uploaded once, whole"
    assert record["downloaded"] and not again["downloaded"] and web.faults.hits(path) == 2


# --- what a person sees ---


def test_the_download_line_says_files_bytes_and_rate():
    stages = {name: StageCounts() for name in ("download", "plan", "fetch", "tokens")}
    stages["download"] = StageCounts(shards=2, bytes=50_000_000, first=0.0, last=10.0)
    snap = Snapshot(stages, {"downloads": 3, "sources": 1}, started=0.0, now=10.0)
    assert "download 2/3 files, 50.0 MB, 5.0 MB/s" in plain_line(snap)
    assert summary_lines(snap)[0] == "download: 2 files, 50.0 MB downloaded in 0:00:10"
    no_downloads = Snapshot({n: StageCounts() for n in ("plan", "fetch", "tokens")}, {}, started=0.0, now=1.0)
    assert "download" not in plain_line(no_downloads)
