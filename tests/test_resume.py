"""Killing `pmd build` (SIGKILL, whole process group) at any point and re-running it gives exactly the
output of an uninterrupted build: same sample keys, same bytes per sample, nothing twice, no temp files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pmd_pipeline.faults import PAUSE_ENV
from tests.helpers import all_samples

PMD = [sys.executable, "-m", "pmd_pipeline.cli"]

# Named crash points (pmd_pipeline/faults.py) and what the killed run must have left behind.
# write_tar and before_stats: killed with tokens on (STREAMING_POINTS), where those moments hold more
KILL_POINTS = ["plan", "fetch", "manifest"]


NO_TOKENS = ["--no-tokenize"]


def start_build(out: Path, ray_address: str, pause_at: str | None = None, args=NO_TOKENS) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    if pause_at:
        env[PAUSE_ENV] = pause_at
    return subprocess.Popen(
        [*PMD, "build", "--out", str(out), "--ray-address", ray_address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def wait_for(predicate, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun_to_completion(out: Path, ray_address: str, args=NO_TOKENS) -> str:
    for marker in out.glob("_paused_at_*"):
        marker.unlink()  # the crash harness's own file, not part of a build
    rerun = subprocess.run(
        [*PMD, "build", "--out", str(out), "--ray-address", ray_address, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return rerun.stderr


def assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    assert all_samples(out) == all_samples(reference)  # keys, member bytes; all_samples refuses duplicates
    assert not list(out.glob("**/*.tmp")), "temporary files left behind"
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert got["totals"] == want["totals"]
    assert [s["shard_files"] for s in got["sources"].values()] == [s["shard_files"] for s in want["sources"].values()]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_a_crash_point_then_rerun_equals_uninterrupted(point, embedded_build, ray_session, tmp_path):
    reference, _ = embedded_build
    out = tmp_path / "killed"
    proc = start_build(out, ray_session, pause_at=point)
    wait_for(lambda: (out / f"_paused_at_{point}").exists() or proc.poll() is not None)
    assert proc.poll() is None, f"the build ended before reaching {point}: {proc.stdout.read().decode()[-2000:]}"
    kill_group(proc)
    assert not (out / "manifest.json").exists()
    rerun_to_completion(out, ray_session)
    assert_same_as_uninterrupted(out, reference)


@pytest.mark.slow
@pytest.mark.soak
def test_sigkill_at_random_moments_repeatedly_then_rerun_equals_uninterrupted(embedded_build, ray_session, tmp_path):
    """Three kills of the same build at seeded random moments (timing-based, unlike the named points)."""
    reference, _ = embedded_build
    out = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(3):
        proc = start_build(out, ray_session)
        time.sleep(rng.uniform(2.0, 10.0))
        kill_group(proc)
    rerun_to_completion(out, ray_session)
    assert_same_as_uninterrupted(out, reference)


# --- kills during the dVAE token stage (a small codebook of the real layout keeps it quick) ---


@pytest.fixture(scope="module")
def tokenized_reference(ray_session, tmp_path_factory):
    """An uninterrupted build with tokens, and the `pmd build` arguments that make the same one."""
    from pmd_pipeline.config import TokenizeConfig
    from tests.helpers import build_embedded
    from tests.test_dvae_codebook import small_hf_folder

    codebook = small_hf_folder(tmp_path_factory.mktemp("codebook") / "small")
    out = tmp_path_factory.mktemp("tokenized") / "pmd_out"
    assert not build_embedded(out, tokenize=TokenizeConfig(codebook=str(codebook))).failed
    assert list(out.glob("*/*_dvae.json")), "the reference build has tokens"
    return out, ["--codebook", str(codebook)]


# Where a streaming build can be killed with tokens on: a shard fetched but not yet tokenized, an actor holding
# a shard's pixels, a tar with tokens complete under its temporary name, tar and sidecar in place without stats.
# write_tar runs in the soak tests only (CI time): a tar under its temporary name is killed in CI by the
# bucket test (test_cluster_storage) and by `pmd tokenize`'s kill below.
STREAMING_POINTS = ["tokens_requested", "tokens", pytest.param("write_tar", marks=pytest.mark.soak), "before_stats"]


@pytest.mark.slow
@pytest.mark.parametrize("point", STREAMING_POINTS)
def test_sigkill_in_the_streaming_build_then_rerun_equals_uninterrupted(
    point, tokenized_reference, ray_session, tmp_path
):
    reference, args = tokenized_reference
    out = tmp_path / "killed"
    proc = start_build(out, ray_session, pause_at=point, args=args)
    wait_for(lambda: (out / f"_paused_at_{point}").exists() or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, f"the build ended before reaching {point}: {proc.stdout.read().decode()[-2000:]}"
    if point == "write_tar":  # checked while paused: once killed, Ray may stop the worker gracefully and clean up
        assert list(out.glob("*/.*.tar.*.tmp")), "paused with a tar under its temporary name"
    if point in ("tokens_requested", "tokens"):  # fetched, not written: no tar of that shard yet
        assert len(list(out.glob("*/*_stats.json"))) < len(list(reference.glob("*/*_stats.json")))
    kill_group(proc)
    assert not (out / "manifest.json").exists()
    rerun_to_completion(out, ray_session, args)
    assert_same_as_uninterrupted(out, reference)
    assert sorted(p.name for p in out.glob("*/*_dvae.json")) == sorted(p.name for p in reference.glob("*/*_dvae.json"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["tokenize", "tokenize_sidecar"])
def test_sigkill_during_pmd_tokenize_then_rerun_equals_uninterrupted(point, tokenized_reference, ray_session, tmp_path):
    """The token pass over a finished build (`pmd tokenize OUT`) rewrites each tar: killed mid-way, it resumes."""
    reference, args = tokenized_reference
    out = tmp_path / "killed"
    rerun_to_completion(out, ray_session)  # a build without tokens
    env = {**os.environ, PAUSE_ENV: point}
    proc = subprocess.Popen(
        [*PMD, "tokenize", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    wait_for(lambda: (out / f"_paused_at_{point}").exists() or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, f"pmd tokenize ended before reaching {point}: {proc.stdout.read().decode()[-2000:]}"
    if point == "tokenize":  # a tokenized tar waits under its temporary name, the old tar is still in place
        assert list(out.glob("*/.*.tar.*.tmp"))
    kill_group(proc)
    (out / f"_paused_at_{point}").unlink()
    done = subprocess.run([*PMD, "tokenize", str(out), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_as_uninterrupted(out, reference)


@pytest.mark.slow
@pytest.mark.soak
def test_sigkill_at_random_moments_of_the_token_stage_then_rerun_equals_uninterrupted(
    tokenized_reference, ray_session, tmp_path
):
    """Two kills at seeded random moments of the token stage (after it has finished one more shard)."""
    reference, args = tokenized_reference
    out = tmp_path / "killed"
    rng = random.Random(11)
    for _ in range(2):
        tokenized = len(list(out.glob("*/*_dvae.json")))
        proc = start_build(out, ray_session, args=args)
        in_token_stage = lambda p=proc, n=tokenized: len(list(out.glob("*/*_dvae.json"))) > n or p.poll() is not None  # noqa: E731
        wait_for(in_token_stage, timeout=300)
        time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the build finished before the kill: too few shards left to tokenize"
        kill_group(proc)
    rerun_to_completion(out, ray_session, args)
    assert_same_as_uninterrupted(out, reference)
