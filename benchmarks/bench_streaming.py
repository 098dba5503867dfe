"""Streaming build vs the two passes: `pmd build` with tokens vs `pmd build --no-tokenize` + `pmd tokenize OUT`.

The same images (synthetic JPEGs from a local threaded server that answers every request after a latency, the
network-bound case of a real crawl), the same config, the CLI as a user runs it (a fresh local Ray per command,
`--workers 2`), dVAE tokens in int8 with the seeded random codebook. Measured in one run:

- wall seconds of the streaming build (`pmd build`), of the two-pass build and of its parts: fetch-only (the
  `--no-tokenize` build) and tokenize-only (the `pmd tokenize OUT` pass); ratios streaming / two-pass (target
  <= 0.7) and streaming / max(fetch-only, tokenize-only) (target <= 1.2);
- that both outputs hold the same tars byte for byte (sha256 of every tar);
- bytes written to OUT per image, streaming / two-pass (expected ~0.5): OUT is polled every POLL_S from this
  process and every distinct file is recorded by identity (inode + birth time, from statx) with the largest
  size seen; the sum over distinct files is what was written (a file renamed into place keeps its identity, a
  tar rewritten by the token pass is a new file).

Sizes by environment variable: PMD_BENCH_IMAGES (2000), PMD_BENCH_SHARD_SIZE (100), PMD_BENCH_LATENCY_S (0.5),
PMD_BENCH_THREADS (4), PMD_BENCH_ROUNDS (1; rounds alternate the order: streaming first, then two-pass first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.local_web import REPO, make_images, serve, stop

IMAGES = int(os.environ.get("PMD_BENCH_IMAGES", 2000))
SHARD_SIZE = int(os.environ.get("PMD_BENCH_SHARD_SIZE", 100))
LATENCY_S = float(os.environ.get("PMD_BENCH_LATENCY_S", 0.5))
THREADS = int(os.environ.get("PMD_BENCH_THREADS", 4))
ROUNDS = int(os.environ.get("PMD_BENCH_ROUNDS", 1))
WORKERS = 2
PRECISION = "int8"
POLL_S = 0.05
CPU_POLL_S = 0.25
CLI_TIMEOUT_S = 900  # one CLI run; a hung build fails the bench instead of blocking it


def run() -> dict:
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    server = None
    try:
        started = time.perf_counter()
        names = make_images(work / "web", IMAGES)
        make_images_s = time.perf_counter() - started
        server, base = serve(work / "web", LATENCY_S)
        config = _write_config(work, base, names)
        rounds = []
        for r in range(ROUNDS):  # alternated, so drift in the machine's load hits both alike
            order = ("streaming", "two_pass") if r % 2 == 0 else ("two_pass", "streaming")
            measured = {name: _RUNS[name](config, work / f"{name}_{r}") for name in order}
            rounds.append({"order": list(order), **measured})
        same = [_compare(work / f"streaming_{r}", work / f"two_pass_{r}") for r in range(ROUNDS)]
        samples = _samples_written(work / "streaming_0")
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
    return _result(rounds, same, samples, make_images_s, load_start)


# --- the measured runs ---


def _streaming(config: Path, out: Path) -> dict:
    with _Written(out) as written:
        seconds = _cli("build", "--config", config, "--out", out, "--workers", WORKERS)
    return {"seconds": seconds, "cpu_seconds": CPU_SECONDS[-1], "bytes": written.totals(), **_work_seconds(out)}


def _two_pass(config: Path, out: Path) -> dict:
    with _Written(out) as written:
        fetch_s = _cli("build", "--config", config, "--out", out, "--workers", WORKERS, "--no-tokenize")
        after_fetch = written.totals()
        tokenize_s = _cli("tokenize", out)
    total = written.totals()
    return {
        "seconds": fetch_s + tokenize_s,
        "fetch_only_seconds": fetch_s,
        "tokenize_only_seconds": tokenize_s,
        "cpu_seconds": {"fetch_only": CPU_SECONDS[-2], "tokenize_only": CPU_SECONDS[-1]},
        "bytes": total,
        "bytes_fetch_pass": after_fetch,
        **_work_seconds(out),
    }


def _work_seconds(out: Path) -> dict:
    """The seconds the shards' own records give: shard tasks (NNNNN_stats.json) and token rewrites (_dvae.json)."""
    shard = [json.loads(p.read_text()).get("seconds", 0) for p in out.glob("*/[0-9]*_stats.json")]
    tokens = [json.loads(p.read_text()).get("seconds", 0) for p in out.glob("*/[0-9]*_dvae.json")]
    return {"sum_shard_task_seconds": round(sum(shard), 1), "sum_token_shard_seconds": round(sum(tokens), 1)}


_RUNS = {"streaming": _streaming, "two_pass": _two_pass}


def _cli(*args) -> float:
    """One `pmd` command in its own process (its own local Ray); its wall seconds, or the stderr tail.

    Also appends the CPU seconds of the command and every process below it (Ray's workers) to `CPU_SECONDS`."""
    cmd = [sys.executable, "-m", "pmd_pipeline.cli", *map(str, args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMD_BENCH_")}  # PMD_* reach Ray's workers
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=REPO)
        cpu = _TreeCpu(proc.pid)
        try:
            code = proc.wait(CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the CLI stops its Ray and exits 143
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        finally:
            cpu.stop()
        seconds = time.perf_counter() - started
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace")[-3000:]
    CPU_SECONDS.append(cpu.seconds)
    what = f"`pmd {' '.join(map(str, args))}`"
    if seconds >= CLI_TIMEOUT_S:
        raise RuntimeError(f"{what} ran past {CLI_TIMEOUT_S} s and was killed; stderr tail:\n{tail}")
    if code:
        raise RuntimeError(f"{what} exited {code}; stderr tail:\n{tail}")
    return round(seconds, 2)


CPU_SECONDS: list[float] = []


class _TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, read from /proc every CPU_POLL_S.

    A lower bound: a process's last CPU_POLL_S before it exits is not seen (Ray's workers live for the run)."""

    def __init__(self, root: int):
        self.root = root
        self.last: dict[tuple[int, int], int] = {}  # (pid, start time) -> utime + stime, in clock ticks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-cpu", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(CPU_POLL_S)

    def _poll(self) -> None:
        procs = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as f:
                        fields = f.read().rsplit(b")", 1)[1].split()
                except OSError:
                    continue
                # after "pid (comm)": state ppid ... utime(12) stime(13) ... starttime(20), 0-based from state
                procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]))
        tree, frontier = set(), [self.root]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            pid = frontier.pop()
            if pid in procs and pid not in tree:
                tree.add(pid)
                frontier.extend(children.get(pid, []))
        for pid in tree:
            _, ticks, start = procs[pid]
            self.last[(pid, start)] = ticks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return round(sum(self.last.values()) / os.sysconf("SC_CLK_TCK"), 1)


def _write_config(work: Path, base: str, names: list[str]) -> Path:
    tsv = work / "urls.tsv"  # Conceptual Captions 3M layout: caption<TAB>url, no header
    tsv.write_text("".join(f"a synthetic photo number {i} of the benchmark\t{base}/{n}\n" for i, n in enumerate(names)))
    host = base.removeprefix("http://")  # the bench server's host:port, that port only
    config = work / "bench.toml"
    config.write_text(
        f"shard_size = {SHARD_SIZE}\n\n"
        f'[sources.conceptual_captions]\nmetadata = ["{tsv}"]\n\n'
        f"[fetch]\nthread_count = {THREADS}\nmax_per_host = {max(THREADS, 16)}\n"
        f'allowed_private_hosts = ["{host}"]\n\n'
        f'[tokenize]\nprecision = "{PRECISION}"\n'
    )
    return config


# --- bytes written: every distinct file seen under OUT, at its largest ---


class _Written:
    """Poll a folder from a thread: {file identity: (largest size seen, last name)} over the whole `with`."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[tuple, tuple[int, str]] = {}
        self.polls = 0
        self.slowest_poll_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="bench-poll", daemon=True)

    def __enter__(self) -> _Written:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the final state, after the last command ended

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._poll()
            took = time.perf_counter() - started
            self.slowest_poll_s = max(self.slowest_poll_s, took)
            self._stop.wait(max(0.0, POLL_S - took))

    def _poll(self) -> None:
        seen = []
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                ident = _identity(path)
                if ident is not None:
                    seen.append((ident[:-1], ident[-1], os.path.relpath(path, self.root)))
        with self._lock:
            self.polls += 1
            for key, size, rel in seen:
                largest = self.files.get(key, (0, rel))[0]
                self.files[key] = (max(largest, size), rel)

    def totals(self) -> dict:
        with self._lock:
            files = list(self.files.values())
        tars = [size for size, rel in files if rel.endswith(".tar") and not _temp(rel)]
        tar_temps = [size for size, rel in files if ".tar." in rel and _temp(rel)]  # a tar caught before its rename
        return {
            "all_files": sum(size for size, _ in files),
            "distinct_files": len(files),
            "tars": sum(tars) + sum(tar_temps),
            "distinct_tars": len(tars) + len(tar_temps),
            "polls": self.polls,
            "slowest_poll_s": round(self.slowest_poll_s, 3),
        }


def _temp(rel: str) -> bool:
    return os.path.basename(rel).startswith(".") and rel.endswith(".tmp")


_STATX_INO, _STATX_SIZE, _STATX_BTIME = 0x100, 0x200, 0x800
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW = -100, 0x100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_statx = getattr(_libc, "statx", None)


def _identity(path: str) -> tuple | None:
    """(device, inode, birth time, size) of a file, or None if it is gone. The birth time tells a new file from an
    earlier one whose inode number the filesystem reused (ext4 does, at once); os.stat has no birth time in 3.11.
    """
    if _statx is not None:
        buf = ctypes.create_string_buffer(256)  # struct statx
        if _statx(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _STATX_INO | _STATX_SIZE | _STATX_BTIME, buf):
            return None
        mask = struct.unpack_from("I", buf, 0)[0]
        ino, size = struct.unpack_from("QQ", buf, 32)
        btime = struct.unpack_from("qI", buf, 80) if mask & _STATX_BTIME else (0, 0)
        dev = struct.unpack_from("II", buf, 136)  # stx_dev_major, stx_dev_minor
        return dev, ino, btime, size
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino, (0, 0), st.st_size


# --- the outputs compared ---


def _compare(a: Path, b: Path) -> dict:
    """Every tar of two outputs: same names, same sha256; other files that differ are listed (times inside)."""
    files_a, files_b = _files(a), _files(b)
    tars = sorted(p for p in files_a | files_b if p.endswith(".tar"))
    differing_tars = [p for p in tars if p not in files_a or p not in files_b or _sha(a / p) != _sha(b / p)]
    others = sorted((files_a | files_b) - set(tars))
    differing_others = [p for p in others if p not in files_a or p not in files_b or _sha(a / p) != _sha(b / p)]
    return {
        "tars": len(tars),
        "tars_identical": not differing_tars and bool(tars),
        "differing_tars": differing_tars,
        "tokens_in_tars": {"streaming": _token_count(a, tars), "two_pass": _token_count(b, tars)},
        "other_files": len(others),
        "other_files_differing": differing_others,
    }


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _token_count(root: Path, tars: list[str]) -> int:
    import tarfile

    count = 0
    for rel in tars:
        if (root / rel).exists():
            with tarfile.open(root / rel) as tar:
                count += sum(1 for m in tar if m.name.endswith(".dvae.npy"))
    return count


def _samples_written(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["totals"]["samples_written"]


# --- the result ---


def _result(rounds: list[dict], same: list[dict], samples: int, make_images_s: float, load_start) -> dict:
    streaming = [r["streaming"]["seconds"] for r in rounds]
    two_pass = [r["two_pass"]["seconds"] for r in rounds]
    fetch_only = [r["two_pass"]["fetch_only_seconds"] for r in rounds]
    tokenize_only = [r["two_pass"]["tokenize_only_seconds"] for r in rounds]
    med = statistics.median
    bytes_stream = [r["streaming"]["bytes"] for r in rounds]
    bytes_two = [r["two_pass"]["bytes"] for r in rounds]
    return {
        "images": IMAGES,
        "samples_written": samples,
        "shards": -(-IMAGES // SHARD_SIZE),
        "shard_size": SHARD_SIZE,
        "latency_s": LATENCY_S,
        "fetch_thread_count": THREADS,
        "workers": WORKERS,
        "precision": PRECISION,
        "codebook": "random, seed 0 (the default; no weights offline)",
        "settings_note": (
            f"every image answered after {LATENCY_S} s, {THREADS} fetch threads per shard task and {WORKERS} tasks"
            f" at a time: at most {WORKERS * THREADS / LATENCY_S:g} images/s fetched, about int8's CPU rate on 2 cores,"
            " so fetch-only and tokenize-only take comparable times"
        ),
        "rounds": ROUNDS,
        "runs": rounds,
        "seconds": {
            "streaming": streaming,
            "two_pass": two_pass,
            "fetch_only": fetch_only,
            "tokenize_only": tokenize_only,
        },
        "ratio_streaming_vs_two_pass": round(med(streaming) / med(two_pass), 3),
        "target_streaming_vs_two_pass": "<= 0.7",
        "ratio_streaming_vs_slowest_part": round(med(streaming) / max(med(fetch_only), med(tokenize_only)), 3),
        "target_streaming_vs_slowest_part": "<= 1.2",
        "ratio_note": "medians over rounds; each CLI run includes its own Ray start, plan and manifest",
        "same_tars_byte_for_byte": all(s["tars_identical"] for s in same),
        "comparison": same,
        "bytes_per_image": {
            "streaming_all_files": round(med(b["all_files"] for b in bytes_stream) / samples),
            "two_pass_all_files": round(med(b["all_files"] for b in bytes_two) / samples),
            "streaming_tars": round(med(b["tars"] for b in bytes_stream) / samples),
            "two_pass_tars": round(med(b["tars"] for b in bytes_two) / samples),
        },
        "ratio_bytes_streaming_vs_two_pass": round(
            med(b["all_files"] for b in bytes_stream) / med(b["all_files"] for b in bytes_two), 3
        ),
        "ratio_tar_bytes_streaming_vs_two_pass": round(
            med(b["tars"] for b in bytes_stream) / med(b["tars"] for b in bytes_two), 3
        ),
        "bytes_method": (
            f"OUT polled every {POLL_S * 1000:.0f} ms from the bench process (os.walk + statx); every distinct file"
            " (device, inode, birth time) counted once at the largest size seen, temporary names included; all"
            " files = everything under OUT (tars, parquet, json, _plan, _work scratch), tars = shard tars only."
            " A file created and removed between two polls would be missed."
        ),
        "make_images_seconds": round(make_images_s, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
