"""The user's disk: links inside OUT, two runs of one OUT, stopping by signal, a full device, an OUT that is no folder.

Nothing a build deletes or overwrites may lie outside OUT; a second run of an OUT is refused while the first
lives (and not after it was killed); SIGINT and SIGTERM stop a build in seconds with one line and a folder that
resumes exactly; a full device is said once; an OUT that cannot be a folder is one line, not a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from tests.test_resume import (
    PMD,
    assert_same_as_uninterrupted,
    kill_group,
    rerun_to_completion,
    start_build,
    wait_for,
)

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    before, found, after = result.output.partition("error:")
    assert found and "error:" not in after, result.output
    assert all(line.startswith("shards") for line in before.strip().splitlines()), result.output  # the bar only
    assert after.count("\n") == 1, result.output  # one line, never wrapped
    message = "error:" + after.rstrip("\n")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, result.output
    return message


# --- links inside OUT: nothing outside it is deleted or overwritten ---


def test_owned_path_refuses_a_link_below_out_and_anything_outside(tmp_path):
    from pmd_pipeline.errors import StopBuild
    from shards.files import atomic_write_bytes, owned_path

    disk = tmp_path / "disk"
    (disk / "real").mkdir(parents=True)
    out = tmp_path / "out"
    out.symlink_to(disk / "real")  # OUT itself may be a link (a folder on another disk)
    assert owned_path(out, out / "_work" / "coco" / "00000") == out / "_work" / "coco" / "00000"
    (tmp_path / "elsewhere").mkdir()
    (out / "_work").symlink_to(tmp_path / "elsewhere")
    for path in (out / "_work", out / "_work" / "coco" / "00000"):
        with pytest.raises(StopBuild, match="is a symbolic link"):
            owned_path(out, path)
    with pytest.raises(StopBuild, match="outside the output folder"):
        owned_path(out, out / ".." / "x")
    (tmp_path / "elsewhere" / "00000").mkdir()
    (tmp_path / "elsewhere" / "00000" / "keep.txt").write_text("mine")
    with pytest.raises(StopBuild):
        atomic_write_bytes(out / "_work" / "00000" / "keep.txt", b"overwritten", within=out)
    assert (tmp_path / "elsewhere" / "00000" / "keep.txt").read_text() == "mine"


@pytest.fixture
def small_build(ray_session, tmp_path):
    """A finished build of a small text corpus (3 shards, one malformed record) through `pmd build --config`."""
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"passage {i} about a cat that sat on a mat"}) for i in range(12)]
    (data / "corpus.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n")
    out = tmp_path / "out"
    config = data / "build.toml"
    config.write_text(
        f'out = "{out}"\nshard_size = 4\n[tokenize]\nenabled = false\n'
        '[sources.text_corpus]\nmetadata = ["corpus.jsonl"]\n'
    )
    result = run("build", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert (out / "text_corpus" / "_rejects.jsonl").read_text().strip()
    return config, out


def _unfinish(out: Path, index: int = 0) -> None:
    """As if the run that made this shard was killed before its completion marker."""
    (out / "text_corpus" / f"{index:05d}_stats.json").unlink()
    (out / "manifest.json").unlink()


def test_a_work_folder_link_is_refused_and_what_it_points_to_survives(small_build, tmp_path):
    config, out = small_build
    scratch = tmp_path / "scratch"  # the user's own folder, holding what a shard's work folder would be
    (scratch / "text_corpus" / "00000").mkdir(parents=True)
    (scratch / "text_corpus" / "00000" / "notes.txt").write_text("the user's notes")
    (scratch / "keep.txt").write_text("keep")
    (out / "_work").symlink_to(scratch)
    _unfinish(out)
    one_line_error(run("build", "--config", str(config)), f"{out / '_work'} is a symbolic link", "Remove the link")
    assert (scratch / "text_corpus" / "00000" / "notes.txt").read_text() == "the user's notes"
    assert (scratch / "keep.txt").read_text() == "keep"


def test_a_rejects_file_link_is_refused_and_the_file_it_points_to_survives(small_build, tmp_path):
    config, out = small_build
    notes = tmp_path / "notes.jsonl"
    notes.write_text("the user's notes\n")
    rejects = out / "text_corpus" / "_rejects.jsonl"
    rejects.unlink()
    rejects.symlink_to(notes)
    (out / "_plan" / "text_corpus" / "_plan.json").unlink()  # a plan killed before its marker: planned again
    one_line_error(run("build", "--config", str(config)), f"{rejects} is a symbolic link")
    assert notes.read_text() == "the user's notes\n"


def test_a_source_folder_link_is_refused_and_the_files_it_points_to_survive(small_build, tmp_path):
    config, out = small_build
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(out / "text_corpus", elsewhere / "text_corpus")
    (out / "text_corpus").symlink_to(elsewhere / "text_corpus")
    _unfinish(out)
    (elsewhere / "text_corpus" / "00000.tar").write_bytes(b"the user's own file")
    one_line_error(run("build", "--config", str(config)), f"{out / 'text_corpus'} is a symbolic link")
    assert (elsewhere / "text_corpus" / "00000.tar").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("link", ["_plan", "_plan/text_corpus"])
def test_a_plan_folder_link_is_refused_and_what_it_points_to_survives(link, small_build, tmp_path):
    config, out = small_build
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(out / link, elsewhere / "plan")
    (out / link).symlink_to(elsewhere / "plan")
    source_plan = elsewhere / "plan" / ("text_corpus" if link == "_plan" else "")
    (source_plan / "_plan.json").unlink()  # a plan killed before its marker: its folder is removed and redone
    (source_plan / "keep.txt").write_text("keep")
    one_line_error(run("build", "--config", str(config)), f"{out / link} is a symbolic link")
    assert (source_plan / "keep.txt").read_text() == "keep"


def test_a_link_met_inside_a_shard_task_stops_the_build_once(small_build, tmp_path):
    """A shard's own file as a link (not checked up front): the task refuses it, once, without retries."""
    config, out = small_build
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"the user's own file")
    parquet = out / "text_corpus" / "00001.parquet"
    parquet.unlink()
    parquet.symlink_to(outside)
    _unfinish(out, 1)
    started = time.time()
    message = one_line_error(run("build", "--config", str(config)), f"{parquet} is a symbolic link")
    assert message.count("symbolic link") == 1
    assert time.time() - started < 30
    assert outside.read_bytes() == b"the user's own file"
    assert not (out / "text_corpus" / "00001_stats.json").exists()


# --- an OUT that is no folder, or cannot be written ---


def test_out_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("the user's file")
    one_line_error(run("build", "--out", str(target)), "is a file, not a folder")
    assert target.read_text() == "the user's file"
    one_line_error(run("tokenize", str(target)), "is not a pmd build output")


def test_out_whose_parent_is_a_file_is_one_line(tmp_path):
    (tmp_path / "results.txt").write_text("the user's file")
    one_line_error(run("build", "--out", str(tmp_path / "results.txt" / "pmd_out")), "results.txt is a file")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_out_that_cannot_be_written_is_one_line(read_only_folder):
    one_line_error(run("build", "--out", str(read_only_folder / "pmd_out")), "cannot write to the output folder")


# --- two runs of one OUT, and a run killed while it held OUT ---


@pytest.mark.slow
def test_a_second_run_of_one_out_is_refused_and_a_killed_run_leaves_no_stale_lock(
    embedded_build, ray_session, tmp_path
):
    reference, _ = embedded_build
    out = tmp_path / "pmd_out"
    first = start_build(out, ray_session, pause_at="fetch")
    try:
        wait_for(lambda: (out / "_paused_at_fetch").exists() or first.poll() is not None)
        assert first.poll() is None, first.stdout.read().decode()[-2000:]
        second_build = ["build", "--out", str(out), "--ray-address", ray_session, "--no-tokenize"]
        for command in (second_build, ["tokenize", str(out)]):
            started = time.time()
            second = subprocess.run([*PMD, *command], capture_output=True, text=True, timeout=120)
            elapsed = time.time() - started
            message = " ".join(second.stderr.split())
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"error: {out} is in use by another pmd run (pid {first.pid})" in message, second.stderr
            assert "Traceback" not in second.stderr
            assert elapsed < 30, f"refused after {elapsed:.1f} s"
    finally:
        if first.poll() is None:  # SIGKILL: the kernel drops its lock (and a failed check leaves no paused build)
            kill_group(first)
    rerun_to_completion(out, ray_session)
    assert_same_as_uninterrupted(out, reference)


# --- SIGTERM and SIGINT stop a build cleanly; the folder resumes exactly ---


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        # soak only (CI time): the same stop path as SIGTERM, the signal also reaching Ray's workers
        pytest.param(signal.SIGINT, 130, id="SIGINT-to-group", marks=pytest.mark.soak),
    ],
)
def test_a_signal_stops_the_build_cleanly_and_a_rerun_equals_uninterrupted(
    signum, code, embedded_build, ray_session, tmp_path
):
    """SIGTERM to the build (a scheduler, `kill`); SIGINT to its process group (Ctrl-C in a terminal)."""
    reference, _ = embedded_build
    out = tmp_path / "stopped"
    proc = start_build(out, ray_session, pause_at="fetch")  # a shard task is mid-shard: an image has arrived
    try:
        wait_for(lambda: (out / "_paused_at_fetch").exists() or proc.poll() is not None)
    except TimeoutError:
        kill_group(proc)  # never paused: no build is left running behind the test
        raise
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    started = time.time()
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        output = proc.communicate(timeout=15)[0].decode()
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"the build ran on for 15 s after {signum.name}")
    elapsed = time.time() - started
    assert proc.returncode == code, output[-3000:]
    assert elapsed < 10, f"{signum.name} took {elapsed:.1f} s to stop the build"
    stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert stopped == [f"stopped by {signum.name}; re-run the same command to resume the build"], output[-3000:]
    assert "Traceback" not in output and "received at time" not in output, output[-3000:]
    assert not (out / "manifest.json").exists()
    rerun_to_completion(out, ray_session)
    assert_same_as_uninterrupted(out, reference)


# --- a full output device: said once, and the folder resumes once there is room ---


@pytest.fixture
def small_device(tmp_path):
    """A real tmpfs of 9 MiB (the embedded sample's images take about 6.5 MiB of it); root only."""
    mount = tmp_path / "small_device"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_device_is_said_once_and_a_rerun_with_room_equals_uninterrupted(
    small_device, embedded_build, ray_session
):
    reference, _ = embedded_build
    out = small_device / "pmd_out"
    full = subprocess.run(
        [*PMD, "build", "--out", str(out), "--ray-address", ray_session, "--no-tokenize"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = full.stdout + full.stderr
    message = " ".join(full.stderr.split())
    assert full.returncode == 2, output[-3000:]
    assert message.count("error: the output device is full") == 1, output[-3000:]
    assert "written there" in message and "re-run the same command" in message, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (out / "manifest.json").exists()
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_device)], check=True)
    rerun_to_completion(out, ray_session)
    assert_same_as_uninterrupted(out, reference)
