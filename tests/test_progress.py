"""What a person sees while a build runs: a live display per stage in a terminal, plain lines in a log."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from pmd_pipeline.progress import Snapshot, StageCounts, plain_line, summary_lines
from tests.test_dvae_codebook import small_hf_folder

PMD = [sys.executable, "-m", "pmd_pipeline.cli"]


def snapshot(now=100.0, **stages) -> Snapshot:
    counts = {name: StageCounts() for name in ("plan", "fetch", "tokens")}
    counts.update(stages)
    return Snapshot(counts, {"shards": 10, "images": 1000, "sources": 2, "tokens": 1}, started=0.0, now=now)


def test_a_plain_line_says_every_stage_its_rate_failures_and_the_eta():
    snap = snapshot(
        plan=StageCounts(shards=2, images=1200, first=0.0, last=2.0),
        fetch=StageCounts(shards=6, images=580, failed=20, first=10.0, last=100.0),  # 600 rows in 90 s
        tokens=StageCounts(shards=4, images=300, first=20.0, last=100.0),  # 300 images in 80 s: the slow stage
    )
    line = plain_line(snap)
    assert "plan 1,200 rows read, 2/2 sources planned" in line
    assert "fetch 6/10 shards, 580 images, 6.4/s, 20 failed" in line
    assert "tokens 4/10 shards, 300 images, 3.8/s" in line
    assert line.endswith("elapsed 0:01:40, ETA 0:03:06")  # 700 images left at 3.75/s
    assert summary_lines(snap) == [
        "plan: 1,200 rows in 0:00:02",
        "fetch: 580 images in 0:01:30",
        "tokens: 300 images in 0:01:20",
        "build: 0:01:40 in all",
    ]


def test_no_eta_before_every_stage_has_begun():
    snap = snapshot(fetch=StageCounts(shards=1, images=50, first=10.0, last=20.0))
    assert plain_line(snap).endswith("ETA ?")


def run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal 120 columns wide; returns (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "CI", "TERM")}
    proc = subprocess.Popen([*PMD, *args], stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"})
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    return proc.wait(timeout=60), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # without colours and cursor moves


def token_counts(output: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"tokens\s+\d+/\d+ shards, ([\d,]+) images", output)]


def test_a_build_in_a_terminal_shows_the_token_line_advancing(tmp_path):
    codebook = small_hf_folder(tmp_path / "codebook")
    code, output = run_in_terminal(["build", "--out", str(tmp_path / "out"), "--codebook", str(codebook)])
    assert code == 0, output[-3000:]
    counts = token_counts(output)
    assert len(set(counts)) >= 3 and counts == sorted(counts), counts  # redrawn as the actors go
    assert re.search(r"fetch\s+17/17 shards", output) and re.search(r"tokens\s+17/17 shards", output)  # the last view
    assert "ETA 0:" in output
    assert re.search(r"tokens: [\d,]+ images in \d:\d\d:\d\d", output)  # the summary's stage times
    assert "Token authentication is enabled" not in output  # Ray's notice on every start is gone (auth is not)


@pytest.mark.slow
def test_a_build_logging_to_a_file_writes_periodic_progress_lines(ray_session, tmp_path):
    codebook = small_hf_folder(tmp_path / "codebook")
    log = tmp_path / "build.log"
    with log.open("w") as stderr:  # on the session's Ray instance: a cluster job's log, without Ray's start-up
        args = ["build", "--out", str(tmp_path / "out"), "--codebook", str(codebook), "--progress-every", "2"]
        args += ["--ray-address", ray_session]
        done = subprocess.run([*PMD, *args], stdout=subprocess.DEVNULL, stderr=stderr, timeout=900)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3, text[-3000:]
    assert all("\x1b[" not in line for line in lines)  # plain text, no terminal codes
    assert all(" | fetch " in line and " | tokens " in line and "ETA" in line for line in lines)
    assert token_counts(text)[-1] > token_counts(text)[0]
    assert "random seeded codebook" not in text  # a real (small) codebook: no placeholder note
    out = tmp_path / "out"  # the closing lines are one line each, however long (rich broke them at 80 columns)
    assert f"\n{out}: 17 shards, 17 built now" in text and f"`pmd stats {out}` for more.\n" in text
