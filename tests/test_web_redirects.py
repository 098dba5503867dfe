"""Redirects the guard allows are followed (many image URLs redirect), each hop checked, none deadlocks."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import polars as pl
import pytest

from pmd_pipeline.fetch.images import fetch_urls
from pmd_pipeline.fetch.web import GuardedOpener, WebPolicy, installed, stream_url
from tests.hostile_web import OK_JPEG, REDIRECTS, HostileWeb
from tests.test_web_faults import hostile_config


def policy_for(*webs: HostileWeb, **kwargs) -> WebPolicy:
    return WebPolicy(retries=0, allowed_private_hosts=frozenset(w.endpoint for w in webs), **kwargs)


@pytest.mark.parametrize("path", REDIRECTS)
def test_an_allowed_redirect_ends_in_the_image(path):
    with HostileWeb() as web:
        started = time.monotonic()
        response = GuardedOpener(policy_for(web)).open(web.url(path))
        assert time.monotonic() - started < 2.0
    assert response.status == 200 and response.read() == OK_JPEG
    assert response.url.endswith(("/ok.jpg", "/chain/0"))


def test_redirects_through_img2datasets_downloader_and_urlopen(tmp_path):
    """The build's own path: img2dataset calls urllib.request.urlopen, which `installed` routes to us."""
    with HostileWeb() as web, HostileWeb() as other:
        paths = [*REDIRECTS, f"/redirect-to-port/{other.httpd.server_address[1]}"]
        cfg = hostile_config(tmp_path / "out", web, other)  # a mirror on two ports, both allowed
        rows = pl.DataFrame({"key": [f"k{i}" for i in range(len(paths))], "image_url": [web.url(p) for p in paths]})
        fetched = fetch_urls(rows, cfg, tmp_path / "work")
        with installed(policy_for(web)), urllib.request.urlopen(web.url("/redirect/307")) as response:
            assert response.read() == OK_JPEG
    failed = {p: fetched[f"k{i}"].error for i, p in enumerate(paths) if fetched[f"k{i}"].jpg is None}
    assert not failed
    assert other.hits["/ok.jpg"] == 1


def test_a_metadata_download_follows_redirects_and_streams_past_the_image_cap():
    with HostileWeb() as web:
        policy = policy_for(web, max_bytes=1000)  # the image cap; metadata files are gigabytes by design
        with stream_url(web.url("/redirect-big/200000"), policy) as response:
            assert response.read() == b"x" * 200_000
        with stream_url(web.url("/chain/3"), policy) as response:
            assert response.read() == OK_JPEG


def test_a_redirect_to_another_port_of_an_allowed_host_is_refused():
    """`127.0.0.1:A` allows port A: a redirect from there to port B of the same host is a request inside."""
    with HostileWeb() as web, HostileWeb() as other:
        url = web.url(f"/redirect-to-port/{other.httpd.server_address[1]}")
        with pytest.raises(urllib.error.URLError, match="pmd:blocked_address"):
            GuardedOpener(policy_for(web)).open(url)
        assert GuardedOpener(policy_for(web, other)).open(url).read() == OK_JPEG
    assert other.hits["/ok.jpg"] == 1


@pytest.mark.parametrize("max_per_host", [1, 2])
def test_same_host_redirects_do_not_wait_for_their_own_slot(max_per_host):
    """Every slot held by a request that redirects to the same host: each must go on in the slot it holds."""
    with HostileWeb() as web:
        opener = GuardedOpener(policy_for(web, max_per_host=max_per_host))
        results: list = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(opener.open(web.url(f"/redirect-same-host/{i}"))))
            for i in range(6)
        ]
        for t in threads:
            t.daemon = True  # on a deadlock the test fails, and the stuck threads do not keep pytest alive
            t.start()
        for t in threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in threads), "requests waited forever for the slot they held"
    assert [r.read() for r in results] == [OK_JPEG] * 6
    assert web.max_concurrent["*"] <= max_per_host
