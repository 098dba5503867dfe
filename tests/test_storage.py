"""The storage layer on a real S3 server (moto's, on 127.0.0.1): whole objects or none, clear errors, and a
trainer that streams its shards from the bucket (or any URL) with the same losses as from a local folder."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.errors import PmdError
from pmd_pipeline.storage import as_path, check_readable, check_writable, is_remote, list_names, local_scratch
from shards.files import atomic_path, atomic_write_json
from tests.s3_server import list_objects, s3_server
from tests.train_fixtures import make_pmd


@pytest.fixture(scope="module")
def s3():
    with s3_server(buckets=("bucket",)) as env:
        yield env


def test_local_paths_stay_pathlib_and_urls_become_remote_paths(s3):
    assert type(as_path("/data/pmd")) is type(Path("/data/pmd")) and not is_remote(as_path("rel/pmd"))
    assert as_path("file:///data/pmd") == Path("/data/pmd")
    remote = as_path("s3://bucket/pmd") / "coco" / "00000.tar"
    assert is_remote(remote) and str(remote) == "s3://bucket/pmd/coco/00000.tar" and remote.name == "00000.tar"
    assert not str(local_scratch(as_path("s3://bucket/pmd"), "_work")).startswith("s3:")
    with pytest.raises(PmdError, match="no storage for protocol 'nosuch'"):
        as_path("nosuch://bucket/pmd")


def test_an_object_appears_whole_when_its_upload_completes_and_never_half(s3):
    target = as_path("s3://bucket/atomic/00000.tar")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a tar")
            raise KeyboardInterrupt  # killed while writing: nothing may be visible
    assert not target.exists()
    seen_during_write = []
    with atomic_path(target, before_rename=lambda: seen_during_write.append(target.exists())) as tmp:
        tmp.write_bytes(b"x" * 100_000)
    assert seen_during_write == [False] and target.read_bytes() == b"x" * 100_000
    assert not tmp.exists(), "the local temporary file is removed after the upload"
    atomic_write_json(as_path("s3://bucket/atomic/00000_stats.json"), {"rows_in": 1})
    assert sorted(list_names(as_path("s3://bucket/atomic"))) == ["00000.tar", "00000_stats.json"]
    assert json.loads(list_objects("s3://bucket/atomic")["00000_stats.json"]) == {"rows_in": 1}


def test_storage_problems_are_one_line_that_says_what_to_do(s3, monkeypatch):
    with pytest.raises(PmdError, match="bucket does not exist"):
        check_writable(as_path("s3://no-such-bucket/pmd"))
    with pytest.raises(PmdError, match="does not exist"):
        check_readable(as_path("s3://bucket/never-built"))
    check_writable(as_path("s3://bucket/pmd-ok"))  # a writable bucket passes, and the probe is gone again
    assert list_names(as_path("s3://bucket/pmd-ok")) == []
    result = CliRunner().invoke(app, ["build", "--out", "s3://no-such-bucket/pmd", "--no-tokenize"])
    assert result.exit_code == 2 and "bucket does not exist" in result.output, result.output
    assert s3["AWS_SECRET_ACCESS_KEY"] not in result.output
    result = CliRunner().invoke(app, ["stats", "s3://bucket/never-built"])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    result = CliRunner().invoke(app, ["verify", "nosuch://bucket/pmd"])
    assert result.exit_code == 2 and "no storage for protocol" in result.output, result.output


def test_an_unreachable_endpoint_stops_the_build_at_once(s3, monkeypatch):
    import s3fs

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        result = CliRunner().invoke(app, ["build", "--out", "s3://bucket/pmd", "--no-tokenize"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert result.exit_code == 2 and "unreachable" in result.output, result.output


# --- the trainer streams from the bucket ------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_shards(s3, tmp_path_factory):
    """The trainer's fixture build, locally and uploaded to s3://bucket/train."""
    local = make_pmd(tmp_path_factory.mktemp("train") / "pmd", per_shard=16, shards=2)
    fs = as_path("s3://bucket").fs
    fs.put(str(local), "bucket/train", recursive=True)
    return local, "s3://bucket/train"


def _losses(shards: str, run_dir: Path) -> list[dict]:
    from pmd_pipeline.train.config import load_train_config
    from pmd_pipeline.train.trainer import train

    cfg = load_train_config(None, run_dir=str(run_dir), vocab_size=200, log_every=100)
    cfg.data.shards, cfg.data.workers, cfg.data.batch_size = shards, 0, 4
    cfg.optim.steps, cfg.optim.warmup_steps = 4, 1
    train(cfg, say=lambda line: None)
    return [json.loads(line)["losses"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_the_trainer_streams_a_build_from_the_bucket_with_the_same_losses(fixture_shards, tmp_path):
    local, remote = fixture_shards
    assert _losses(remote, tmp_path / "remote") == _losses(str(local), tmp_path / "local")
    assert not any(p.suffix == ".tar" for p in (tmp_path / "remote").rglob("*")), "no local copy of the shards"


def test_brace_lists_and_pipe_urls_are_accepted(fixture_shards, tmp_path):
    from pmd_pipeline.train.config import DataConfig
    from pmd_pipeline.train.preflight import preflight
    from shards.tar import shard_samples

    local, remote = fixture_shards
    listed = preflight(DataConfig(shards=f"{remote}/cc3m/{{00000..00001}}.tar::{remote}/coco/00000.tar"))
    assert listed.tars["pairs"] == [f"{remote}/cc3m/00000.tar", f"{remote}/cc3m/00001.tar", f"{remote}/coco/00000.tar"]
    assert listed.mix["image"] == listed.mix["text"] == 0.0 and listed.notes
    keys = [s["__key__"] for s in shard_samples(listed.tars["pairs"])]
    piped = [s["__key__"] for s in shard_samples([f"pipe:cat {local}/cc3m/00000.tar"])]
    assert len(keys) == 48 and len(set(keys)) == 48 and piped == keys[:16]


class _DroppingServer(http.server.ThreadingHTTPServer):
    """Serves one tar; the first `drops` responses stop halfway and close the connection."""

    def __init__(self, body: bytes, drops: int):
        self.body, self.drops, self.requests = body, drops, 0
        super().__init__(("127.0.0.1", 0), _DroppingHandler)


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.body)))
        self.end_headers()
        if server.requests <= server.drops:
            self.wfile.write(server.body[: len(server.body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(server.body)

    def do_HEAD(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("drops, expect_all", [(1, True), (99, False)])
def test_a_connection_broken_mid_shard_is_retried_or_the_shard_is_counted(fixture_shards, drops, expect_all):
    from pmd_pipeline.train.data import decode_sample
    from shards.tar import shard_samples

    local, _ = fixture_shards
    body = (local / "cc3m" / "00000.tar").read_bytes()
    server = _DroppingServer(body, drops)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
        samples = list(shard_samples([url, f"{local}/coco/00000.tar"]))
    finally:
        server.shutdown()
        server.server_close()
    from_http = [s for s in samples if "cc3m" in s.get("__key__", "")]
    reasons = [decode_sample(s, "pairs")[1] for s in samples if "__error__" in s]
    assert len([s for s in samples if "coco" in s.get("__key__", "")]) == 16, "the next shard is read either way"
    if expect_all:
        assert [s["__key__"] for s in from_http] == [f"cc3m_00000_{i:04d}" for i in range(16)] and not reasons
    else:
        assert reasons == ["shard_unreadable"] and len(from_http) < 16
