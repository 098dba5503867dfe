"""Nothing from the data is trusted: names, tar members, image bytes and config files."""

from __future__ import annotations

import io
import tarfile
import urllib.error

import polars as pl
import pytest
from PIL import Image

from pmd_pipeline.config import BuildConfig, FetchConfig, ImageConfig
from pmd_pipeline.config_file import load_config
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.images import make_resizer, read_local
from pmd_pipeline.fetch.mirror import use_mirror
from pmd_pipeline.fetch.web import GuardedOpener, WebPolicy, allowed_endpoints
from shards.layout import check_safe_name
from sources.base import make_key
from tests.hostile_web import HostileWeb, jpeg, png_claiming


@pytest.mark.parametrize(
    "original_id",
    ["../../etc/passwd", "a/b", "a\\b", "x.jpg", "..", "", "\x00nul", "naïve", "a" * 5000, "id with spaces", 12],
)
def test_sample_keys_from_hostile_ids_are_safe_names(original_id):
    key = make_key("src", original_id)
    assert check_safe_name(key) == key
    assert "/" not in key and "." not in key and "\\" not in key


@pytest.mark.parametrize("name", ["../x", "a/b", "a.b", "", ".hidden", "a\x00b", "x" * 201])
def test_unsafe_names_are_refused_before_they_become_files(name):
    with pytest.raises(ValueError, match="unsafe"):
        check_safe_name(name)


def test_tar_members_have_safe_names_modes_and_owners(embedded_build):
    out, _ = embedded_build
    tars = sorted(out.glob("*/0*.tar"))
    assert tars
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isfile(), f"{path}: {member.name} is not a regular file"
                assert "/" not in member.name and not member.name.startswith(".")
                assert member.mode == 0o444 and member.mtime == 0
                assert (member.uname, member.gname) == ("pmd", "pmd")
                key = member.name.split(".", 1)[0]
                assert check_safe_name(key) == key


def test_images_are_reencoded_never_stored_byte_for_byte(tmp_path):
    """Even with resize_mode "no", the stored bytes are a fresh encode of the decoded pixels."""
    original = jpeg((224, 224), (10, 200, 90))
    (tmp_path / "a.jpg").write_bytes(original + b"trailing bytes a hostile file carried")
    for mode in ("center_crop", "no"):
        cfg = BuildConfig(image=ImageConfig(resize_mode=mode))
        rows = pl.DataFrame(
            {"key": ["k"], "image_path": [str(tmp_path / "a.jpg")], "crop_box": [None]},
            schema={"key": pl.Utf8, "image_path": pl.Utf8, "crop_box": pl.List(pl.Int64)},
        )
        stored = read_local(rows, cfg)["k"].jpg
        assert stored != original and b"trailing" not in stored
        assert Image.open(io.BytesIO(stored)).size == (224, 224)


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding():
    resizer = make_resizer(ImageConfig(max_pixels=50_000_000))
    img, *_, error = resizer(io.BytesIO(png_claiming(100_000, 100_000)))
    assert img is None and error.startswith("pmd:image_too_many_pixels")
    small = make_resizer(ImageConfig(max_pixels=1000))
    assert small(io.BytesIO(jpeg((64, 48))))[-1].startswith("pmd:image_too_many_pixels")


def test_config_files_are_data_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.toml"
    config.write_text(
        f"out = \"__import__('os').system('touch {marker}')\"\n"
        '[sources.text_corpus]\nmetadata = ["x.txt"]\noptions = { text_field = "exec(1)" }\n'
    )
    cfg = load_config(config)
    assert not marker.exists()
    assert cfg.sources[0].options == {"text_field": "exec(1)"}  # options are declared per source: a known one
    config.write_text("import os\nos.system('true')\n")
    with pytest.raises(PmdError, match="not valid TOML"):
        load_config(config)


def _allowing(*entries: str) -> GuardedOpener:
    return GuardedOpener(WebPolicy(retries=0, allowed_private_hosts=frozenset(entries)))


def test_an_allowed_private_host_is_allowed_on_its_listed_port_only():
    """`host:port` is that port: a mirror's host is not every service that host runs."""
    with HostileWeb() as web, HostileWeb() as other:
        assert _allowing(web.endpoint).open(web.url("/ok.jpg")).status == 200
        with pytest.raises(urllib.error.URLError, match="pmd:blocked_address"):
            _allowing(web.endpoint).open(other.url("/ok.jpg"))
    assert other.hits["/ok.jpg"] == 0


def test_a_bare_allowed_host_means_its_default_ports_only():
    assert allowed_endpoints("Cache") == [("cache", 80), ("cache", 443)]
    assert allowed_endpoints("cache:8080") == [("cache", 8080)]
    assert allowed_endpoints("[::1]:81") == [("::1", 81)] and allowed_endpoints("::1") == [("::1", 80), ("::1", 443)]
    with pytest.raises(ValueError, match="not host or host:port"):
        WebPolicy(allowed_private_hosts=frozenset({"cache:http"}))
    with HostileWeb() as web:  # on an ephemeral port, neither 80 nor 443
        with pytest.raises(urllib.error.URLError, match="pmd:blocked_address"):
            _allowing("127.0.0.1").open(web.url("/ok.jpg"))
    assert web.hits["/ok.jpg"] == 0


@pytest.mark.parametrize(
    ("mirror", "entry"),
    [
        ("http://127.0.0.1:8765", "127.0.0.1:8765"),  # the embedded default's StaticServer
        ("https://cache.internal/", "cache.internal:443"),
        ("http://Cache.Internal/pmd/", "cache.internal:80"),
        ("http://[::1]:81/", "[::1]:81"),
    ],
)
def test_a_mirror_allows_its_own_host_and_port(mirror, entry):
    fetch = FetchConfig()
    use_mirror(fetch, mirror)
    use_mirror(fetch, mirror)
    assert fetch.allowed_private_hosts == [entry]
    assert WebPolicy.from_config(fetch).allowed_private_hosts == {entry}
