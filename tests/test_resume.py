"""Killing `pmd build` midway and re-running it gives exactly the samples of an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import all_samples

PMD = [sys.executable, "-m", "pmd_pipeline.cli"]


def start_build(out: Path, ray_address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*PMD, "build", "--out", str(out), "--ray-address", ray_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_uninterrupted(embedded_build, ray_session, tmp_path):
    reference, _ = embedded_build
    out = tmp_path / "killed"
    proc = start_build(out, ray_session)
    wait_for(lambda: len(list(out.glob("*/*_stats.json"))) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("*/*_stats.json")))
    assert finished < 6, "the build finished before it could be killed; the test proves nothing"
    rerun = subprocess.run(
        [*PMD, "build", "--out", str(out), "--ray-address", ray_session], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{finished} already finished" in rerun.stderr.replace("\n", " ")
    assert all_samples(out) == all_samples(reference)
    assert not list(out.glob("**/*.tmp")), "temporary files left behind"
