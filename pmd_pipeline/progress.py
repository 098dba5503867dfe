"""Live progress of a build: counters the Ray tasks and actors add to, and what the CLI shows of them.

Tasks and actors send counts to one `ProgressCounter` actor (fire-and-forget, batched by `Reporter` to a
few calls a second); the driver reads a snapshot while it waits for work. The CLI shows the snapshot as a
live display in a terminal, or as a plain line every N seconds when stderr is a file (CI, a cluster log).
Counts are for this run only: shards a previous run finished are not counted again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter

import ray

STAGES = ("download", "plan", "fetch", "tokens")
REPORT_EVERY_S = 0.5  # how often a task sends its counts: a few small calls a second, whatever the image rate


@dataclasses.dataclass
class StageCounts:
    """One stage's counts: `shards` and `images` done (rows for the plan; files for the downloads), `failed`
    images (files), `bytes` downloaded, and the first and last time anything was counted (the stage's wall
    time, and its rate)."""

    shards: int = 0
    images: int = 0
    failed: int = 0
    bytes: int = 0
    first: float | None = None
    last: float | None = None

    def rate(self, now: float) -> float:
        """Images a second since the stage began."""
        if self.first is None or self.images == 0:
            return 0.0
        return self.images / max(now - self.first, 1e-3)

    def byte_rate(self, now: float) -> float:
        """Bytes a second since the stage began."""
        if self.first is None or self.bytes == 0:
            return 0.0
        return self.bytes / max(now - self.first, 1e-3)

    @property
    def seconds(self) -> float:
        return 0.0 if self.first is None else self.last - self.first


@dataclasses.dataclass
class Snapshot:
    stages: dict[str, StageCounts]
    totals: dict[str, int]  # "shards": shards this run has to do, "images": their plan rows (an upper bound)
    started: float
    now: float

    def eta_s(self) -> float | None:
        """Seconds left for the build: the slowest stage's remaining images at its rate so far."""
        images = self.totals.get("images", 0)
        if not images:
            return None
        left = []
        for name in ("fetch", "tokens"):
            stage = self.stages[name]
            if name == "tokens" and not self.totals.get("tokens"):
                continue  # no token stage in this run
            remaining = max(images - stage.images - stage.failed, 0)
            rate = (stage.images + stage.failed) / max(self.now - stage.first, 1e-3) if stage.first else 0
            if remaining and not rate:
                return None  # a stage that has not begun: no honest estimate yet
            left.append(remaining / rate if remaining else 0.0)
        return max(left, default=None)


@ray.remote(num_cpus=0)
class ProgressCounter:
    """The one place a build's counts meet; needs no CPU, so it never waits for one."""

    def __init__(self) -> None:
        self.stages = {name: StageCounts() for name in STAGES}
        self.totals: dict[str, int] = {}
        self.started = time.time()

    def add(self, stage: str, counts: dict[str, int]) -> None:
        now = time.time()
        counted = self.stages[stage]
        for field, value in counts.items():
            setattr(counted, field, getattr(counted, field) + value)
        counted.first = now if counted.first is None else counted.first
        counted.last = now

    def set_totals(self, **totals: int) -> None:
        self.totals.update(totals)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.stages, self.totals, self.started, time.time())  # Ray sends a copy


class Watch:
    """The driver's side: hands `on_progress` a fresh snapshot at most every REPORT_EVERY_S while it waits."""

    def __init__(self, counter, on_progress):
        self.counter, self.on_progress = counter, on_progress
        self.shown_at = 0.0

    def __call__(self) -> None:
        if self.on_progress and time.time() - self.shown_at >= REPORT_EVERY_S:
            self.shown_at = time.time()
            self.on_progress(self.snapshot())

    def snapshot(self) -> Snapshot:
        return ray.get(self.counter.snapshot.remote())


class Reporter:
    """A task's side: counts are summed locally and sent at most every REPORT_EVERY_S (and at `flush`).

    img2dataset's downloader threads report through one Reporter, hence the lock. `counter` None: counts
    go nowhere (a shard processed outside a build, as in the unit tests)."""

    def __init__(self, counter, stage: str):
        self.counter, self.stage = counter, stage
        self.pending: Counter = Counter()
        self.sent_at = 0.0
        self.lock = threading.Lock()

    def add(self, **counts: int) -> None:
        if self.counter is None:
            return
        with self.lock:
            self.pending.update(counts)
            due = time.time() - self.sent_at >= REPORT_EVERY_S
        if due:
            self.flush()

    def flush(self) -> None:
        if self.counter is None:
            return
        with self.lock:
            pending, self.pending = dict(self.pending), Counter()
            self.sent_at = time.time()
        if pending:
            self.counter.add.remote(self.stage, pending)


# --- what a person sees: a live display in a terminal, plain lines in a log ---


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def stage_lines(snap: Snapshot) -> list[tuple[str, str]]:
    """(stage, what it has done) for every stage of this run, in flow order."""
    shards = snap.totals.get("shards", 0)
    plan, fetch, tokens = (snap.stages[name] for name in ("plan", "fetch", "tokens"))
    lines = []
    if snap.totals.get("downloads"):  # files named by URL: downloaded (or found whole) before the plan
        download = snap.stages.get("download", StageCounts())
        failed = f", {download.failed} failed" if download.failed else ""
        finished = download.shards + download.failed >= snap.totals["downloads"]
        rate = download.byte_rate(download.last if finished else snap.now)  # a finished stage's rate holds
        lines.append(
            (
                "download",
                f"{download.shards}/{snap.totals['downloads']} files, {_megabytes(download.bytes)}, "
                f"{rate / 1e6:.1f} MB/s{failed}",
            )
        )
    lines.append(("plan", f"{plan.images:,} rows read, {plan.shards}/{snap.totals.get('sources', 0)} sources planned"))
    failed = f", {fetch.failed:,} failed" if fetch.failed else ""
    lines.append(
        ("fetch", f"{fetch.shards}/{shards} shards, {fetch.images:,} images, {fetch.rate(snap.now):.1f}/s{failed}")
    )
    if snap.totals.get("tokens"):
        rate = tokens.rate(snap.now)
        lines.append(("tokens", f"{tokens.shards}/{shards} shards, {tokens.images:,} images, {rate:.1f}/s"))
    return lines


def plain_line(snap: Snapshot) -> str:
    stages = " | ".join(f"{name} {text}" for name, text in stage_lines(snap))
    return f"progress: {stages} | elapsed {_clock(snap.now - snap.started)}, ETA {_clock(snap.eta_s())}"


class BuildDisplay:
    """Shows snapshots: a rich Live table on a terminal, else a plain line every `every_s` seconds (0: none)."""

    def __init__(self, console, every_s: float):
        self.console, self.every_s = console, every_s
        self.live = None
        self.printed_at = 0.0

    def __enter__(self) -> BuildDisplay:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        self.printed_at = time.time()  # the first plain line after `every_s`: a short run prints none
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def show(self, snap: Snapshot) -> None:
        if self.live is not None:
            self.live.update(self._table(snap))
        elif self.every_s and time.time() - self.printed_at >= self.every_s:
            self.printed_at = time.time()
            self.console.print(plain_line(snap), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _table(snap: Snapshot):
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for name, text in stage_lines(snap):
            table.add_row(f"[bold]{name}", text)
        table.add_row("[bold]build", f"elapsed {_clock(snap.now - snap.started)}, ETA {_clock(snap.eta_s())}")
        return table


def summary_lines(snap: Snapshot) -> list[str]:
    """How long each stage of this run took (first to last count: stages overlap in a streaming build)."""
    lines = []
    for name in STAGES:
        stage = snap.stages.get(name)
        if stage is None or stage.first is None:
            continue
        if name == "download":
            failed = f" ({stage.failed:,} failed)" if stage.failed else ""
            size = _megabytes(stage.bytes)
            lines.append(f"download: {stage.shards:,} files{failed}, {size} downloaded in {_clock(stage.seconds)}")
            continue
        unit = "rows" if name == "plan" else "images"
        lines.append(f"{name}: {stage.images:,} {unit} in {_clock(stage.seconds)}")
    lines.append(f"build: {_clock(snap.now - snap.started)} in all")
    return lines
