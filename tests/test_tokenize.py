"""Tokenizing shards: atomic rewrite + sidecar last, resume, codebook refusal, failed samples, build and CLI."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from pmd_pipeline.errors import PmdError
from pmd_pipeline.tokens.codebook import load_codebook
from pmd_pipeline.tokens.encoder import DvaeTokenizer, encoder_pixels
from pmd_pipeline.tokens.shard import tokenize_shard
from pmd_pipeline.tokens.stage import calibration_pixels, refuse_mixed_precision
from shards.files import atomic_write_json
from shards.layout import ShardPaths
from shards.sidecar import INT8_SUFFIX
from shards.tar import read_samples, write_tar
from tests.test_dvae_codebook import small_hf_folder


def jpeg(seed, size=(224, 224)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_shard(out, n=5, source="toy"):
    """A finished shard as the writer leaves it: image samples, one text-only, one non-square, one broken JPEG."""
    paths = ShardPaths(out, source, 0)
    samples = [{"__key__": f"img{i}", "jpg": jpeg(i), "txt": b"a caption", "json": b"{}"} for i in range(n)]
    samples += [
        {"__key__": "textonly", "txt": b"just text"},
        {"__key__": "wide", "jpg": jpeg(9, (224, 100)), "json": b"{}"},
        {"__key__": "broken", "jpg": b"<html>not an image</html>", "json": b"{}"},
    ]
    paths.folder.mkdir(parents=True)
    _, sha = write_tar(paths.tar, samples)
    atomic_write_json(paths.stats, {"shard": paths.name, "samples_written": len(samples), "tar_sha256": sha})
    return paths


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = small_hf_folder(tmp_path_factory.mktemp("codebook") / "small")
    codebook = load_codebook(folder)
    return folder, codebook.identity, DvaeTokenizer(codebook.model, "fp32", "cpu")


def test_tokens_are_added_to_every_image_sample_and_the_sidecar_is_right(tmp_path, small):
    _, identity, tokenizer = small
    paths = make_shard(tmp_path)
    sidecar = tokenize_shard(paths, tokenizer, identity, batch_size=2)
    samples = {s["__key__"]: s for s in wds.WebDataset(str(paths.tar), shardshuffle=False)}
    grids = {k: np.load(io.BytesIO(s["dvae.npy"])) for k, s in samples.items() if "dvae.npy" in s}
    assert sorted(grids) == [f"img{i}" for i in range(5)]
    for key, grid in grids.items():
        assert grid.shape == (14, 14) and grid.dtype == np.uint16 and grid.max() < 8192
        expected = tokenizer.tokens(encoder_pixels(samples[key]["jpg"])[None])
        assert np.array_equal(grid, expected[0])  # batching changes nothing
    assert samples["img0"]["jpg"] == jpeg(0) and samples["textonly"]["txt"] == b"just text"
    assert sidecar["samples_tokenized"] == 5 and sidecar["samples_failed"] == 2
    assert sidecar["failure_reasons"] == {"dvae_image_not_square": 1, "dvae_decode_error": 1}
    assert len(sidecar["code_counts"]) == 8192 and sum(sidecar["code_counts"]) == 5 * 196
    assert sidecar["tar_sha256"] == hashlib.sha256(paths.tar.read_bytes()).hexdigest()
    assert sidecar["tar_bytes"] == paths.tar.stat().st_size and sidecar["codebook"] == identity
    assert json.loads(paths.sidecar.read_text()) == sidecar
    assert not sidecar["codebook_random"]


def test_bad_token_arrays_are_failed_samples_not_crashes(tmp_path, small):
    _, identity, tokenizer = small

    class WrongTokenizer:
        precision, int8_agreement = "fp32", None

        def tokens(self, pixels):
            return np.full((len(pixels), 14, 14), 9000, np.uint16)  # out of the codebook's range

    paths = make_shard(tmp_path, n=2)
    sidecar = tokenize_shard(paths, WrongTokenizer(), identity, batch_size=4)
    assert sidecar["samples_tokenized"] == 0 and sidecar["failure_reasons"]["dvae_out_of_range"] == 2
    assert not any(name.endswith(".dvae.npy") for s in read_samples(paths.tar) for name in s)


def test_killed_attempt_is_redone_and_a_finished_shard_is_skipped(tmp_path, small):
    _, identity, tokenizer = small
    paths = make_shard(tmp_path, n=2)
    original = paths.tar.read_bytes()
    stale = paths.folder / f".{paths.name}.tar.123.dead.tmp"  # a killed attempt's half-written tar
    stale.write_bytes(original[:1000])
    assert not paths.sidecar.exists()
    sidecar = tokenize_shard(paths, tokenizer, identity, batch_size=2)
    assert not stale.exists() and sidecar["samples_tokenized"] == 2
    mtime = paths.tar.stat().st_mtime_ns
    again = tokenize_shard(paths, tokenizer, identity, batch_size=2)
    assert again["skipped"] and paths.tar.stat().st_mtime_ns == mtime
    # a crash between the tar's rename and the sidecar: tokens exist, no sidecar -> redone, same bytes
    tokenized = paths.tar.read_bytes()
    paths.sidecar.unlink()
    assert tokenize_shard(paths, tokenizer, identity, batch_size=2)["tar_sha256"] == sidecar["tar_sha256"]
    assert paths.tar.read_bytes() == tokenized
    # a sidecar damaged from outside (it is written atomically) is not trusted: the shard is redone
    paths.sidecar.write_text(paths.sidecar.read_text()[:300])
    assert not tokenize_shard(paths, tokenizer, identity, batch_size=2).get("skipped")
    assert json.loads(paths.sidecar.read_text())["tar_sha256"] == sidecar["tar_sha256"]


def test_an_interrupted_rewrite_leaves_the_old_tar_intact(tmp_path, small, monkeypatch):
    _, identity, tokenizer = small
    paths = make_shard(tmp_path, n=2)
    before = paths.tar.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("shards.files.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenize_shard(paths, tokenizer, identity, batch_size=2)
    assert paths.tar.read_bytes() == before and not paths.sidecar.exists()
    assert not list(paths.folder.glob(".*.tmp"))


def test_another_codebook_is_refused_without_force(tmp_path, small):
    _, identity, tokenizer = small
    paths = make_shard(tmp_path, n=2)
    tokenize_shard(paths, tokenizer, identity, batch_size=2)
    with pytest.raises(PmdError, match="tokenized with codebook"):
        tokenize_shard(paths, tokenizer, "random, seed 0", batch_size=2)
    redone = tokenize_shard(paths, tokenizer, "random, seed 0", batch_size=2, force=True)
    assert redone["codebook"] == "random, seed 0" and redone["codebook_random"]


def test_unfinished_shard_is_refused(tmp_path, small):
    _, identity, tokenizer = small
    paths = make_shard(tmp_path, n=1)
    paths.stats.unlink()
    with pytest.raises(PmdError, match="not a finished shard"):
        tokenize_shard(paths, tokenizer, identity, batch_size=2)


def test_build_tokenizes_every_image_shard_and_pmd_tokenize_redoes_them(ray_session, tmp_path, small):
    from typer.testing import CliRunner

    from pmd_pipeline.cli import app
    from pmd_pipeline.config import TokenizeConfig
    from tests.helpers import build_embedded

    folder, identity, _ = small
    out = tmp_path / "out"

    result = build_embedded(out, shard_size=40, tokenize=TokenizeConfig(codebook=str(folder), batch_size=16))
    assert not result.shards_failed
    manifest = result.manifest
    assert manifest["tokens"]["codebook"] == identity and not manifest["tokens"]["random"]
    # each source's parquet has its own filter-score columns: read the common ones
    parquet = pl.concat([pl.read_parquet(p, columns=["key", "status"]) for p in out.glob("*/0*.parquet")])
    written = set(parquet.filter(pl.col("status") == "written")["key"])
    for source in manifest["sources"].values():
        for shard in source["shard_files"]:
            tar = out / shard["tar"]
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == shard["sha256"]
            for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
                if "jpg" not in sample:  # text-only samples (text_corpus) have no image, so no tokens
                    written.discard(sample["__key__"])
                    continue
                assert np.load(io.BytesIO(sample["dvae.npy"])).shape == (14, 14)
                written.discard(sample["__key__"])
    assert not written  # every written image sample carries tokens

    runner = CliRunner()
    refused = runner.invoke(app, ["tokenize", str(out), "--codebook", ""])
    assert refused.exit_code == 2 and "--force" in refused.output
    sidecars = sorted(out.glob("*/*_dvae.json"))
    mtimes = [p.stat().st_mtime_ns for p in sidecars]
    same = runner.invoke(app, ["tokenize", str(out)])
    assert same.exit_code == 0, same.output
    assert mtimes == [p.stat().st_mtime_ns for p in sidecars]  # nothing redone

    # int8 tokens are an approximation with their own identity: refused over fp32 ones without --force
    refused = runner.invoke(app, ["tokenize", str(out), "--precision", "int8"])
    message = refused.output.splitlines()[-1]  # one line, never wrapped
    assert refused.exit_code == 2 and "int8 approximation" in message and "--force" in message
    redone = runner.invoke(app, ["tokenize", str(out), "--precision", "int8", "--force"])
    assert redone.exit_code == 0, redone.output
    for path in sidecars:
        sidecar = json.loads(path.read_text())
        assert sidecar["codebook"] == identity + INT8_SUFFIX and sidecar["precision"] == "int8"
        assert 0.0 <= sidecar["int8_agreement_vs_fp32"] <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"]["codebook"] == identity + INT8_SUFFIX
    agreement = json.loads(sidecars[0].read_text())["int8_agreement_vs_fp32"]
    assert f"int8 approximation of the encoder: {agreement:.1%} of grid cells" in manifest["tokens"]["note"]
    bad = runner.invoke(app, ["tokenize", str(out), "--precision", "fp8"])
    assert bad.exit_code == 2 and "precision 'fp8' is not one of" in bad.output


def test_int8_calibration_images_come_from_every_shard_in_order_and_skip_bad_images(tmp_path):
    first, second = make_shard(tmp_path / "a", n=1), make_shard(tmp_path / "b", n=3)
    expected = [encoder_pixels(jpeg(0)), *(encoder_pixels(jpeg(i)) for i in range(3))]
    np.testing.assert_array_equal(calibration_pixels([first, second], count=4), np.stack(expected))
    np.testing.assert_array_equal(calibration_pixels([first, second], count=2), np.stack(expected[:2]))
    with pytest.raises(PmdError, match="int8 calibrates on the build's images, and it has 1"):
        calibration_pixels([first])


def test_int8_streaming_calibration_waits_for_the_first_shards_in_plan_order(tmp_path, ray_session):
    """Shards offer their images as they are fetched, in any order; the calibration is decided once every shard
    before the 32nd image is known, and equals the token pass's over the same finished tars."""
    import ray

    from pmd_pipeline.tokens.stage import CALIBRATION_IMAGES, first_rgb, start_calibration

    shards = [make_shard(tmp_path / f"s{i}", n=n) for i, n in enumerate((20, 30, 5))]
    done = shards[0]  # finished by an earlier run: the driver offers it
    pending = [ShardPaths(tmp_path / "s1", "toy", 0), ShardPaths(tmp_path / "s2", "toy", 0)]
    collector = start_calibration([done, *(ShardPaths(tmp_path / "new", "toy", i) for i in (1, 2))])
    try:
        assert ray.get(collector.needs.remote(1)) and ray.get(collector.needs.remote(2))
        ray.get(collector.offer.remote(2, first_rgb([pending[1]])))  # a later shard fetched first: not enough
        ready, _ = ray.wait([collector.calibration.remote()], timeout=0.5)
        assert ready == [] and ray.get(collector.needs.remote(1))
        ray.get(collector.offer.remote(1, first_rgb([pending[0]])))
        got = ray.get(collector.calibration.remote(), timeout=30)
        assert not ray.get(collector.needs.remote(1))
    finally:
        ray.kill(collector)
    want = calibration_pixels(shards)
    assert len(want) == CALIBRATION_IMAGES
    np.testing.assert_array_equal(got, want)


def test_int8_calibration_is_offered_once_a_shards_first_images_in_plan_order_are_fetched(tmp_path, ray_session):
    """While a streaming shard still fetches, its feed offers the calibration as soon as its first 32 decodable
    images in plan order are known, whatever order the outcomes come in: the images the token pass takes from
    the finished tar."""
    import random

    import ray

    from pmd_pipeline.tokens.stage import CalibrationCollector, CalibrationFeed
    from shards.writer import Fetched

    keys = [f"k{i:02d}" for i in range(45)]
    outcomes = {key: Fetched(jpg=jpeg(i)) for i, key in enumerate(keys)}
    outcomes["k02"] = Fetched(reason="http_404", error="HTTP Error 404")  # no image in the tar
    outcomes["k05"] = Fetched(jpg=b"<html>not an image</html>")  # in the tar, not decodable
    outcomes["k07"] = Fetched(jpg=jpeg(7, (224, 100)))  # not square
    paths = ShardPaths(tmp_path, "toy", 0)
    paths.folder.mkdir(parents=True)
    samples = [{"__key__": k, "txt": b"x", **({"jpg": f.jpg} if f.jpg else {})} for k, f in outcomes.items()]
    write_tar(paths.tar, samples)
    want = calibration_pixels([paths])  # the 32nd decodable image in plan order is k34's
    collector = CalibrationCollector.remote(1)
    try:
        feed = CalibrationFeed(collector, 0, keys)
        arrivals = [key for key in keys if key != "k34"]
        random.Random(0).shuffle(arrivals)
        for key in arrivals:
            feed(key, outcomes[key])
        ready, _ = ray.wait([collector.calibration.remote()], timeout=0.5)
        assert ready == [] and not feed.offered, "k34's outcome is not known yet"
        feed("k34", outcomes["k34"])
        assert feed.offered
        got = ray.get(collector.calibration.remote(), timeout=30)
    finally:
        ray.kill(collector)
    np.testing.assert_array_equal(got, want)


def test_a_shard_with_fewer_calibration_images_offers_them_once_it_is_fetched(tmp_path, ray_session):
    """Five images, one failed: the feed cannot know it has them all until the fetch ends (`finish`), then
    offers them, the token pass's images over the same tar; an outcome the feed never saw is taken too."""
    import ray

    from pmd_pipeline.tokens.stage import CalibrationCollector, CalibrationFeed
    from shards.writer import Fetched

    keys = [f"k{i}" for i in range(6)]
    fetched = {key: Fetched(jpg=jpeg(i)) for i, key in enumerate(keys)}
    fetched["k3"] = Fetched(reason="timeout", error="timed out")
    paths = ShardPaths(tmp_path, "toy", 0)
    paths.folder.mkdir(parents=True)
    write_tar(paths.tar, [{"__key__": k, "txt": b"x", **({"jpg": f.jpg} if f.jpg else {})} for k, f in fetched.items()])
    collector = CalibrationCollector.remote(1)
    try:
        feed = CalibrationFeed(collector, 0, keys)
        for key in ("k5", "k0", "k3", "k2"):  # k1 and k4 never reported
            feed(key, fetched[key])
        assert not feed.offered
        feed.finish(fetched)
        assert feed.offered
        got = ray.get(collector.calibration.remote(), timeout=30)
    finally:
        ray.kill(collector)
    np.testing.assert_array_equal(got, calibration_pixels([paths]))


def test_a_build_holds_one_precision_of_tokens_unless_forced(tmp_path, small):
    _, identity, tokenizer = small
    first, second = make_shard(tmp_path / "a", n=1), make_shard(tmp_path / "b", n=1)
    tokenize_shard(first, tokenizer, identity, batch_size=1)  # fp32 tokens
    refuse_mixed_precision([first, second], "fp32", force=False)  # same precision, untokenized shard: fine
    with pytest.raises(PmdError, match="holds fp32 tokens and this run makes bf16 ones"):
        refuse_mixed_precision([first, second], "bf16", force=False)
    refuse_mixed_precision([first, second], "bf16", force=True)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=[pytest.mark.slow, pytest.mark.soak])])
def test_the_streaming_build_writes_each_tar_once_and_equals_the_two_pass_build(
    embedded_build, tmp_path, small, precision
):
    """`pmd build` streams shards through the token actors; `--no-tokenize` + `pmd tokenize` is the two-pass way.
    Same tars byte for byte, same sidecars; streamed tars are written once (their stats hold the final hash),
    int8's too (its calibration is gathered from the first shards as they are fetched)."""
    from pmd_pipeline.build import retokenize
    from pmd_pipeline.config import TokenizeConfig
    from tests.helpers import build_embedded

    folder, _, _ = small
    streamed, two_pass = tmp_path / "streamed", tmp_path / "two_pass"
    assert not build_embedded(streamed, tokenize=TokenizeConfig(codebook=str(folder), precision=precision)).failed
    shutil.copytree(embedded_build[0], two_pass)  # pass one: the session's build without tokens
    assert not retokenize(two_pass, codebook=str(folder), precision=precision)["failed"]

    tars = sorted(p.relative_to(streamed) for p in streamed.glob("*/0*.tar"))
    assert tars == sorted(p.relative_to(two_pass) for p in two_pass.glob("*/0*.tar")) and len(tars) > 10
    for tar in tars:
        assert (streamed / tar).read_bytes() == (two_pass / tar).read_bytes(), tar
    rewritten = []
    for sidecar_path in sorted(streamed.glob("*/*_dvae.json")):
        sidecar = json.loads(sidecar_path.read_text())
        other = json.loads((two_pass / sidecar_path.relative_to(streamed)).read_text())
        assert {k: v for k, v in sidecar.items() if k != "seconds"} == {
            k: v for k, v in other.items() if k != "seconds"
        }
        stats = json.loads(sidecar_path.with_name(sidecar_path.name.replace("_dvae.json", "_stats.json")).read_text())
        if stats["tar_sha256"] != sidecar["tar_sha256"]:
            rewritten.append(sidecar_path.name)
    assert rewritten == []  # every tar written once, with its tokens
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (streamed, two_pass))
    assert got["tokens"] == want["tokens"] and got["totals"] == want["totals"]


def test_one_actor_quantizes_and_the_others_get_its_ranges_or_quantize_themselves(ray_session):
    """The first to claim quantizes; the others wait for what it shares. A failure shared (None), or nothing
    shared in time (a crashed actor), sends each waiter to quantize for itself; a late failure does not undo
    a success."""
    import ray

    from pmd_pipeline.tokens.stage import CalibrationCollector

    collector = CalibrationCollector.remote(1)
    try:
        assert ray.get(collector.claim.remote()) is True
        assert ray.get(collector.claim.remote()) is False
        assert ray.get(collector.shared.remote(0.2)) is None  # the claimer is still at it (or dead)
        waiting = collector.shared.remote(30)
        ray.get(collector.share.remote(({"ranges": 1}, 0.93)))
        assert ray.get(waiting, timeout=30) == ({"ranges": 1}, 0.93)
        ray.get(collector.share.remote(None))  # a waiter that quantized for itself and failed
        assert ray.get(collector.shared.remote(1)) == ({"ranges": 1}, 0.93)
    finally:
        ray.kill(collector)
    failed = CalibrationCollector.remote(1)
    try:
        ray.get(failed.claim.remote())
        ray.get(failed.share.remote(None))
        assert ray.get(failed.shared.remote(30)) is None  # at once: each actor quantizes for itself
    finally:
        ray.kill(failed)


@pytest.mark.slow
def test_an_int8_streaming_build_without_images_fails_its_shards_with_the_reason_and_does_not_hang(
    tmp_path, small, caplog, ray_session
):
    """Text only: int8 has no image to calibrate on. Every actor starts quantizing at once and waits for the
    others; the failure must reach the shard tasks (stated, the shards unfinished), not leave them waiting."""
    import logging

    from pmd_pipeline.config import TokenizeConfig
    from pmd_pipeline.embedded import default_config
    from tests.helpers import build_embedded

    folder, _, _ = small
    out = tmp_path / "out"
    text_only = [s for s in default_config(str(out)).sources if s.name == "text_corpus"]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        result = build_embedded(out, tokenize=TokenizeConfig(codebook=str(folder), precision="int8"), sources=text_only)
    assert result.failed and result.shards_failed and result.shards_done == 0
    assert "int8 calibrates on the build's images, and it has 0" in caplog.text
    assert time.monotonic() - started < 300
