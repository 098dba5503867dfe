"""The web misbehaves on purpose (tests/hostile_web.py): every fault ends as its own reason code, fast."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
from pathlib import Path

import polars as pl
import pytest

from pmd_pipeline.build import build
from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.fetch.images import fetch_urls
from pmd_pipeline.fetch.web import GuardedOpener, WebError, WebPolicy, stream_url
from tests.hostile_web import FAULTS, HostileWeb, TrickledTls


def hostile_config(out: Path, *webs: HostileWeb) -> BuildConfig:
    cfg = BuildConfig(out=str(out))
    cfg.fetch.timeout_s = 2.0  # generous enough that a loaded machine does not turn a reset into a timeout
    cfg.fetch.deadline_s = 3.0
    cfg.fetch.retries = 1
    cfg.fetch.backoff_s = 0.01
    cfg.fetch.max_response_bytes = 5_000_000
    cfg.fetch.allowed_private_hosts = [w.endpoint for w in webs]  # the test servers; "localhost" stays refused
    return cfg


def test_every_fault_gets_its_own_reason_code_and_no_worker_hangs(tmp_path):
    with HostileWeb(hang_s=5.0) as web:
        cfg = hostile_config(tmp_path / "out", web)
        keys = [f"k{i}" for i in range(len(FAULTS))]
        rows = pl.DataFrame({"key": keys, "image_url": [web.url(p) for p in FAULTS]})
        started = time.monotonic()
        fetched = fetch_urls(rows, cfg, tmp_path / "work")
        elapsed = time.monotonic() - started
    got = {path: fetched[key].reason for key, path in zip(keys, FAULTS, strict=True)}
    # /hang ends as the deadline's doing here whenever connecting took over deadline_s - timeout_s (a loaded
    # box): both codes are right for it, so its exact code is checked below with the two limits far apart.
    assert got.pop("/hang") in {"timeout", "deadline_exceeded"}
    assert got == {path: reason for path, reason in FAULTS.items() if path != "/hang"}
    assert fetched["k0"].jpg[:2] == b"\xff\xd8" and fetched["k0"].width == 224
    # Every request is bounded by deadline_s (3 s) per attempt; all run in parallel threads.
    # Unbounded waits would take 3 s (hang) to forever (trickle) per retry; 20 s leaves room for a loaded CI box.
    assert elapsed < 20, f"fetching the faults took {elapsed:.1f} s: something waited past its timeout"
    assert web.hits["/status/404"] == 1, "a 404 is final: never retried"
    assert web.hits["/status/503"] == 2 and web.hits["/status/429"] == 2, "transient: retried `retries` times"
    assert web.hits["/redirect-metadata"] == 1  # and 169.254.169.254 was never contacted (it would time out)


def test_a_server_that_never_answers_is_a_timeout_not_the_deadline(tmp_path):
    with HostileWeb(hang_s=4.0) as web:
        cfg = hostile_config(tmp_path / "out", web)
        cfg.fetch.timeout_s = 0.5  # the socket gives up long before the 15 s deadline, however loaded the box
        cfg.fetch.deadline_s = 15.0
        rows = pl.DataFrame({"key": ["k0"], "image_url": [web.url("/hang")]})
        fetched = fetch_urls(rows, cfg, tmp_path / "work")
    assert fetched["k0"].reason == "timeout"
    assert web.hits["/hang"] == 2, "a timeout is transient: retried `retries` times"


def test_429_and_503_back_off_as_the_server_asks_then_succeed():
    with HostileWeb() as web:
        policy = WebPolicy(retries=3, backoff_s=0.01, allowed_private_hosts=frozenset({web.endpoint}))
        started = time.monotonic()
        response = GuardedOpener(policy).open(web.url("/flaky/503/2"))
        elapsed = time.monotonic() - started
    assert response.read()[:2] == b"\xff\xd8"
    assert web.hits["/flaky/503/2"] == 3
    assert elapsed >= 2.0, "Retry-After: 1 was honoured on both retries"


def test_backoff_is_capped_and_exponential():
    opener = GuardedOpener(WebPolicy(backoff_s=0.5, backoff_max_s=3.0))
    plain = OSError("reset")
    assert [opener._backoff(a, plain) for a in range(4)] == [0.5, 1.0, 2.0, 3.0]
    asked = urllib.error.HTTPError("http://x", 429, "slow down", {"Retry-After": "3600"}, None)
    assert opener._backoff(0, asked) == 3.0, "a server cannot make us sleep an hour"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.0.0.1/a.jpg",
        "http://192.168.1.1/a.jpg",
        "http://[::1]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://127.0.0.1:9/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
    ],
)
def test_private_loopback_and_metadata_addresses_are_refused_without_an_allowance(url):
    with pytest.raises(urllib.error.URLError, match="pmd:blocked_address"):
        GuardedOpener(WebPolicy(retries=0)).open(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "data:,hello", "gopher://x/"])
def test_only_http_and_https_are_fetched(url):
    with pytest.raises(WebError, match="pmd:url_scheme_not_allowed"):
        GuardedOpener(WebPolicy()).open(url)


def test_an_allowed_mirror_host_is_reachable_and_nothing_else_local_is():
    with HostileWeb() as web:
        allowed = WebPolicy(retries=0, allowed_private_hosts=frozenset({web.endpoint}))
        assert GuardedOpener(allowed).open(web.url("/ok.jpg")).status == 200
        with pytest.raises(urllib.error.URLError, match="pmd:blocked_address"):
            GuardedOpener(allowed).open(web.url("/ok.jpg").replace("127.0.0.1", "localhost"))


def test_concurrent_requests_per_host_are_limited():
    with HostileWeb() as web:
        opener = GuardedOpener(WebPolicy(max_per_host=3, allowed_private_hosts=frozenset({web.endpoint})))
        threads = [threading.Thread(target=opener.open, args=(web.url(f"/slow/{i}"),)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(web.hits[f"/slow/{i}"] for i in range(12)) == 12
    assert web.max_concurrent["*"] == 3


def test_a_build_over_the_hostile_web_accounts_for_every_row(ray_session, tmp_path):
    with HostileWeb(hang_s=5.0) as web:
        cfg = hostile_config(tmp_path / "out", web)
        cfg.shard_size = 8
        tsv = tmp_path / "cc3m.tsv"
        tsv.write_text("".join(f"a photo of fault {i}\t{web.url(p)}\n" for i, p in enumerate(FAULTS)))
        cfg.sources = [SourceConfig("conceptual_captions", metadata=[str(tsv)])]
        started = time.monotonic()
        result = build(cfg)
        assert time.monotonic() - started < 90
    assert not result.shards_failed
    table = pl.read_parquet(tmp_path / "out" / "conceptual_captions" / "*.parquet")
    by_url = {row["image_url"].split(":", 2)[2].split("/", 1)[1]: row for row in table.iter_rows(named=True)}
    for path, reason in FAULTS.items():
        row = by_url[path.lstrip("/")]
        if path == "/hang":  # timeout, or the deadline's doing on a loaded box (see the first test)
            assert (row["status"], row["reason"]) in {("failed", "timeout"), ("failed", "deadline_exceeded")}
            continue
        assert (row["status"], row["reason"]) == (("written", None) if reason is None else ("failed", reason)), path
    for stats_file in (tmp_path / "out" / "conceptual_captions").glob("*_stats.json"):
        s = json.loads(stats_file.read_text())
        assert s["rows_in"] == s["samples_written"] + sum(s["rows_dropped"].values()) + sum(s["rows_failed"].values())
    totals = result.manifest["totals"]
    assert totals["rows_in"] == len(FAULTS) and totals["samples_written"] == 1


@pytest.mark.parametrize("path", ["/trickle", "/trickle-status", "/trickle-headers", "/continue-flood"])
def test_the_deadline_covers_status_line_headers_and_body(path):
    """Each byte arrives well within timeout_s; only the whole-request deadline can end these."""
    with HostileWeb(hang_s=30.0) as web:
        policy = WebPolicy(timeout_s=1.0, deadline_s=2.0, retries=1, allowed_private_hosts=frozenset({web.endpoint}))
        started = time.monotonic()
        with pytest.raises(OSError, match="pmd:deadline_exceeded"):
            GuardedOpener(policy).open(web.url(path))
        elapsed = time.monotonic() - started
    assert elapsed < policy.deadline_s + 1.0, f"{path} held the request {elapsed:.1f} s"
    assert web.hits[path] == 1, "a server that used up the deadline once is not given a second one"


@pytest.mark.parametrize("path", ["/trickle-status", "/continue-flood"])
def test_a_metadata_download_has_the_deadline_until_its_headers(path):
    with HostileWeb() as web:
        policy = WebPolicy(timeout_s=1.0, deadline_s=2.0, allowed_private_hosts=frozenset({web.endpoint}))
        started = time.monotonic()
        with pytest.raises(OSError, match="pmd:deadline_exceeded"):
            stream_url(web.url(path), policy)
        assert time.monotonic() - started < policy.deadline_s + 1.0


def test_a_trickled_tls_handshake_ends_at_the_deadline():
    """timeout_s alone would let the handshake run 5 s; the deadline (1.5 s) ends it."""
    with TrickledTls() as server:
        policy = WebPolicy(timeout_s=5.0, deadline_s=1.5, retries=1, allowed_private_hosts=frozenset({server.endpoint}))
        started = time.monotonic()
        with pytest.raises(OSError, match="pmd:deadline_exceeded"):
            GuardedOpener(policy).open(f"https://{server.endpoint}/a.jpg")
        assert time.monotonic() - started < policy.deadline_s + 1.0
