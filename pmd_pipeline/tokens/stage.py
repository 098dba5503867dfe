"""The token stage on Ray: a pool of actors that each load the dVAE encoder once.

One actor per GPU when the cluster has GPUs; otherwise CPU actors, by default one single-threaded actor
per core of the largest node (see `_actor_count`).

In `pmd build` the stage streams: each shard task, once its images are fetched, sends their pixels to an
actor (`ShardTokens.request`) and writes its tar once, with the tokens, while later shards fetch. The token
pass over finished tars (`tokenize_shards`) serves `pmd tokenize OUT` and shards a build finished without
tokens (an earlier `--no-tokenize` run). int8 calibrates on the build's first 32 images, gathered as the first
shards fetch them (`CalibrationCollector`), so it streams too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import time
from collections import Counter

import numpy as np
import ray

from pmd_pipeline.config import TokenizeConfig
from pmd_pipeline.errors import DiskFull, PmdError, StopBuild, is_disk_full
from pmd_pipeline.faults import crash_point
from pmd_pipeline.progress import Reporter
from pmd_pipeline.tokens.codebook import codebook_identity
from pmd_pipeline.tokens.encoder import (
    BadImage,
    check_precision,
    encoder_input,
    encoder_rgb,
    token_problem,
    tokens_identity,
)
from pmd_pipeline.tokens.shard import needs_tokens, npy_bytes
from shards.layout import IMAGE_EXT, TOKENS_EXT, ShardPaths
from shards.sidecar import make_sidecar, read_sidecar
from shards.writer import Fetched

CALIBRATION_IMAGES = 32  # int8: half fit the activation ranges, half measure agreement with fp32
FETCH_NICENESS = 10  # of a fetching task while CPU actors encode (ShardTokens.give_way)
SHARED_RANGES_WAIT_S = 600.0  # an actor waits this long for another's int8 ranges, then quantizes for itself

log = logging.getLogger(__name__)


def shards_to_tokenize(shards: list[ShardPaths], tcfg: TokenizeConfig, force: bool = False) -> list[ShardPaths]:
    """Shards without tokens of this codebook; refuses (PmdError) to mix codebooks unless `force`."""
    check_precision(tcfg.precision)  # before any work, not first in the actors
    identity = tokens_identity(codebook_identity(tcfg.codebook, tcfg.seed), tcfg.precision)
    return [s for s in shards if needs_tokens(s, identity, force)]


def calibration_pixels(shards: list[ShardPaths], count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Encoder pixels of the first `count` decodable images of the build, in shard order (int8's calibration).

    Taken from every finished shard, not only those left to do, so a resumed run calibrates identically.
    """
    return _calibration(first_rgb(shards, count))


def _calibration(rgb: list[np.ndarray]) -> np.ndarray:
    if len(rgb) < 2:
        raise PmdError(f"dVAE precision int8 calibrates on the build's images, and it has {len(rgb)}; use fp32")
    return encoder_input(np.stack(rgb))


def first_rgb(shards: list[ShardPaths], count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """encoder_rgb of up to `count` decodable images of `shards`' tars, in order."""
    rgb = []
    for paths in shards:
        with paths.tar.open("rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(f".{IMAGE_EXT}"):
                    try:
                        rgb.append(encoder_rgb(tar.extractfile(member).read()))
                    except BadImage:
                        continue
                    if len(rgb) == count:
                        return rgb
    return rgb


@ray.remote(num_cpus=0)
class CalibrationCollector:
    """int8's calibration in a streaming build: the first CALIBRATION_IMAGES decodable images in shard order,
    gathered as shard tasks fetch them (`offer`), so later shards fetch while the first ones are still on the
    way and the actors quantize (`calibration`, which waits until the images before it are all known).

    The rule is `calibration_pixels`' over finished tars: the driver offers the finished shards' images, shard
    tasks offer theirs in plan order before they ask for tokens, so a resumed run calibrates identically."""

    def __init__(self, shard_count: int):
        import asyncio

        self.shard_count = shard_count
        self.offered: dict[int, list[np.ndarray]] = {}
        self.decided: np.ndarray | PmdError | None = None
        self.event = asyncio.Event()
        self.claimed = False  # an actor is quantizing: the others wait for its ranges (`shared`)
        self.quantized: tuple | None = None
        self.quantized_event = asyncio.Event()

    async def offer(self, index: int, rgb: list[np.ndarray]) -> None:
        if self.decided is None:
            self.offered.setdefault(index, rgb[:CALIBRATION_IMAGES])
            self._decide()

    async def needs(self, index: int) -> bool:
        """True while the calibration still needs shard `index`'s images (a build stops if that shard failed)."""
        return self.decided is None and index not in self.offered

    async def calibration(self) -> np.ndarray:
        await self.event.wait()
        if isinstance(self.decided, PmdError):
            raise self.decided
        return self.decided

    async def claim(self) -> bool:
        """True for the first actor to ask: it quantizes and `share`s its ranges. Each actor quantizing for
        itself ran the same ~30 s of fp32 passes on every core at once, while the fetch tasks waited for them."""
        first, self.claimed = not self.claimed, True
        return first

    async def share(self, quantized: tuple | None) -> None:
        """(int8 ranges, agreement) from the actor that claimed, or None if it failed: each actor then quantizes
        for itself (and meets the same error, where its shard task reports it)."""
        self.quantized = self.quantized or quantized  # a later actor's failure does not undo a success
        self.quantized_event.set()

    async def shared(self, timeout_s: float) -> tuple | None:
        """The claimer's (ranges, agreement); None if it failed or has not shared within `timeout_s` (a
        crashed actor never will): the caller quantizes for itself, so nothing waits on a dead actor."""
        import asyncio

        try:
            await asyncio.wait_for(self.quantized_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.quantized

    def _decide(self) -> None:
        rgb: list[np.ndarray] = []
        for index in range(self.shard_count):
            if index not in self.offered:
                return  # an earlier shard's images are not known yet
            rgb.extend(self.offered[index])
            if len(rgb) >= CALIBRATION_IMAGES:
                break
        try:
            self.decided = _calibration(rgb[:CALIBRATION_IMAGES])
        except PmdError as err:
            self.decided = err
        self.offered.clear()
        self.event.set()


def start_calibration(shards: list[ShardPaths]):
    """A CalibrationCollector for a streaming int8 build over `shards` (in plan order), told the finished ones."""
    collector = CalibrationCollector.remote(len(shards))
    known = 0
    for index, paths in enumerate(shards):
        if known >= CALIBRATION_IMAGES:
            break
        if paths.is_done():
            rgb = first_rgb([paths])
            known += len(rgb)
            collector.offer.remote(index, rgb)
    return collector


def refuse_mixed_precision(shards: list[ShardPaths], precision: str, force: bool) -> None:
    """fp32 and bf16 tokens of one codebook differ in ~2% of cells: a build holds one kind unless `force`."""
    if force:  # every shard is redone in this run's precision: nothing to read
        return
    for paths in shards:
        sidecar = read_sidecar(paths) or {}
        if sidecar.get("precision", precision) != precision:
            raise PmdError(
                f"{paths.tar} holds {sidecar['precision']} tokens and this run makes {precision} ones; set "
                f'[tokenize] precision = "{sidecar["precision"]}", or redo every shard with `pmd tokenize OUT --force`'
            )


def tokenize_shards(pool: TokenPool, todo: list[ShardPaths], force: bool = False, on_wait=None) -> list[str]:
    """The token pass over finished shards (`pmd tokenize OUT`, or shards a build finished without tokens):
    each tar is read back and rewritten with its tokens. Returns the tars that failed (a re-run redoes them).

    `on_wait()` is called at least every second while shards are in flight (the CLI's live display)."""
    failed: list[str] = []
    queue = list(reversed(todo))
    in_flight: dict = {}
    while queue or in_flight:
        for actor in pool.actors:
            if queue and actor not in in_flight.values():
                in_flight[actor.tokenize.remote(queue.pop(), force)] = actor
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        if on_wait:
            on_wait()
        if not ready:
            continue
        in_flight.pop(ready[0])
        try:
            ray.get(ready[0])
        except StopBuild:  # a link in OUT: every shard would meet it
            raise
        except ray.exceptions.RayError as err:
            if is_disk_full(err):  # stop once, not one failure per shard
                raise DiskFull(f"no space left on the output device: {str(err).splitlines()[0]}") from None
            log.error("tokenizing failed: %s", err)
            failed.append(str(err).splitlines()[0])
    return failed


@dataclasses.dataclass
class ShardTokens:
    """What a shard task needs to have its images tokenized by one actor of the pool, and to write the sidecar."""

    actor: ray.actor.ActorHandle
    identity: str
    precision: str
    int8_agreement: float | None
    counter: ray.actor.ActorHandle | None = None  # the build's ProgressCounter
    on_cpu: bool = False  # the actors encode on CPUs: the fetching tasks give way to them (see `give_way`)
    collector: ray.actor.ActorHandle | None = None  # int8 streaming: the CalibrationCollector ...
    index: int = 0  # ... and this shard's place in the build's plan order

    def give_way(self) -> None:
        """On a CPU-only node the encoder is the bottleneck and uses every core, while a fetch waits on the
        network: the fetching thread (and the downloader threads it starts, which inherit it) runs at nice 10,
        so the encoder's threads are not preempted by it (oneDNN's threads wait for their slowest one).
        Measured in BENCHMARKS.md (issue 14). A Ray worker only ever runs our tasks, so the change is harmless."""
        if self.on_cpu:
            os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), FETCH_NICENESS))

    def request(self, fetched: dict[str, Fetched], out) -> tuple[dict[str, bytes], Counter, float]:
        """{key: KEY.dvae.npy bytes} of every fetched image, the failures by reason, and the seconds it took.

        The same bytes and reasons as the token pass over a written tar (tokens.shard.add_tokens): decoding
        and resizing happen here, on the fetching CPU; the actor gets uint8 pixels and only encodes.
        int8's calibration was offered this shard's images before (`calibration_feed`).
        """
        started = time.time()
        failures: Counter = Counter()
        keys, pixels = [], []
        for key, result in fetched.items():
            if result.jpg is None:
                continue
            try:
                pixels.append(encoder_rgb(result.jpg))
                keys.append(key)
            except BadImage as err:
                failures[err.reason] += 1
        crash_point("tokens_requested", out)
        # ray.get in a task gives its CPU back while it waits, so later shards fetch meanwhile
        grids, agreement = ray.get(self.actor.encode.remote(np.stack(pixels), str(out))) if pixels else ([], None)
        if self.precision == "int8" and self.int8_agreement is None:
            # known once the actor calibrated. It comes with the tokens: a separate call would queue behind
            # every shard sent to the actor meanwhile, and hold this task (and its in-flight slot) until then.
            self.int8_agreement = agreement if pixels else ray.get(self.actor.describe.remote())[2]
        tokens = {}
        for key, grid in zip(keys, grids, strict=True):
            problem = token_problem(grid)
            if problem:
                failures[problem] += 1
            else:
                tokens[key] = npy_bytes(grid)
        progress = Reporter(self.counter, "tokens")  # a shard of text alone counts too: it is done
        progress.add(shards=1)
        progress.flush()
        return tokens, failures, time.time() - started

    def calibration_feed(self, image_keys: list[str]) -> CalibrationFeed | None:
        """int8 streaming: an `on_image(key, fetched)` for this shard's fetch that offers the calibration its
        images as soon as the first ones in plan order are known, so the actors quantize while the rest of the
        shard fetches (a shard of 100 images at 0.5 s each took 13 s to fetch whole). `image_keys`: the keys
        that get an image outcome, in plan order. None when the calibration does not wait for this shard.
        Its `finish(fetched)` must be called once the shard is fetched, before `request`."""
        if self.collector is None or not ray.get(self.collector.needs.remote(self.index)):
            return None
        return CalibrationFeed(self.collector, self.index, image_keys)

    def sidecar(self, tokens: dict[str, bytes], failures: Counter, seconds: float, stats: dict) -> dict:
        return make_sidecar(
            self.identity,
            [{TOKENS_EXT: grid} for grid in tokens.values()],
            failures,
            stats["tar_bytes"],
            stats["tar_sha256"],
            seconds=round(seconds, 3),
            precision=self.precision,
            int8_agreement_vs_fp32=self.int8_agreement,
        )


class CalibrationFeed:
    """A shard's first CALIBRATION_IMAGES decodable images in plan order (the rule `first_rgb` applies to a
    finished tar), offered to the CalibrationCollector as soon as they are all known."""

    def __init__(self, collector, index: int, image_keys: list[str]):
        self.collector, self.index, self.keys = collector, index, image_keys
        self.waiting: dict[str, Fetched] = {}  # outcomes that came before an earlier key's
        self.next = 0  # the first place in plan order whose outcome is not known yet
        self.rgb: list[np.ndarray] = []
        self.offered = False

    def __call__(self, key: str, fetched: Fetched) -> None:
        if not self.offered:
            self.waiting[key] = fetched
            self._take_known()

    def finish(self, fetched: dict[str, Fetched]) -> None:
        """The shard is fetched: take the rest in plan order (a key without an outcome has no image) and offer
        what there is, e.g. a shard with fewer images than CALIBRATION_IMAGES, or none. The actor may be
        waiting for these very images: this comes before the shard asks for its tokens."""
        if not self.offered:
            self.waiting = {key: fetched.get(key, Fetched()) for key in self.keys[self.next :]}
            self._take_known()
            self._offer()

    def _take_known(self) -> None:
        while self.next < len(self.keys) and self.keys[self.next] in self.waiting and not self._full():
            got = self.waiting.pop(self.keys[self.next])
            self.next += 1
            if got.jpg is not None:
                try:
                    self.rgb.append(encoder_rgb(got.jpg))
                except BadImage:
                    pass
        if self._full() or self.next == len(self.keys):
            self._offer()

    def _offer(self) -> None:
        if not self.offered:
            self.offered = True
            ray.get(self.collector.offer.remote(self.index, self.rgb))

    def _full(self) -> bool:
        return len(self.rgb) == CALIBRATION_IMAGES


class TokenPool:
    """The run's dVAE actors: one per GPU, or CPU actors. In a streaming build (`streaming`) CPU actors
    reserve no Ray CPU and the fetching tasks give way to them; the token pass alone reserves every core.

    int8 calibrates on `calibration` (encoder pixels), or, in a streaming build, on what `collector` (a
    CalibrationCollector) gathers from the first shards: the actors start at once and wait for it."""

    def __init__(
        self, tcfg: TokenizeConfig, calibration: np.ndarray | None, counter=None, streaming=False, collector=None
    ):
        if counter is not None:
            counter.add.remote("tokens", {})  # the stage's clock starts now (loading the encoder is part of it)
        self.actors, (self.identity, self.precision) = _start_actors(
            tcfg, _actor_count(tcfg), calibration if collector is None else collector, counter, streaming
        )
        self.counter = counter
        self.collector = collector
        self.on_cpu = not int(ray.cluster_resources().get("GPU", 0))
        self.load = dict.fromkeys(range(len(self.actors)), 0)  # shards handed to each actor and not yet back
        self.int8_agreement = None
        if collector is None:
            try:
                self.int8_agreement = ray.get(self.actors[0].describe.remote())[2]
            except BaseException:
                self.close()
                raise
        elif self.precision == "int8":
            for actor in self.actors:  # each actor's first call: every encode queues behind it
                actor.calibrate_early.remote()

    def target(self, index: int = 0) -> tuple[int, ShardTokens]:
        """The least-loaded actor for the shard at `index` in plan order (the actor's number: give it back
        with `done`)."""
        number = min(self.load, key=self.load.get)
        self.load[number] += 1
        tokens = ShardTokens(
            self.actors[number], self.identity, self.precision, self.int8_agreement, self.counter, self.on_cpu,
            self.collector, index,
        )  # fmt: skip
        return number, tokens

    def stalled_by(self, index: int) -> bool:
        """Whether int8's calibration still waits for the shard at `index` (which failed: it never will)."""
        return self.collector is not None and ray.get(self.collector.needs.remote(index))

    def done(self, index: int) -> None:
        self.load[index] -= 1

    def close(self) -> None:
        """Every way out (done, a refusal, a full device, a signal) kills the actors: none goes on writing."""
        for actor in self.actors:
            ray.kill(actor)


def _actor_count(tcfg: TokenizeConfig) -> int:
    """One actor per GPU; without GPUs one single-threaded actor per core of the largest node. One encoder
    on every core, its threads meeting at each layer, lost a fifth of its rate whenever a fetching task took a
    core for a moment (the others wait at the barrier); single-threaded actors wait for nobody: a streaming
    build took 234 s against 274 s on 2 cores (BENCHMARKS.md, issue 14)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return tcfg.actors or gpus or _node_cpus()


def _node_cpus() -> int:
    """CPUs of the largest node: an actor runs on one node, whatever the cluster's total."""
    return max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1) or 1


def _start_actors(tcfg: TokenizeConfig, count: int, calibration, counter, streaming: bool) -> list:
    if int(ray.cluster_resources().get("GPU", 0)):
        options, threads = {"num_gpus": 1, "num_cpus": 1}, 1
    else:  # torch uses `threads` cores. Streaming, the actor reserves none: the fetch tasks keep every CPU slot
        # (a fetch waits on the network; reserving cores for the encoder halved the build's fetch concurrency),
        # they run at nice 10 (ShardTokens.give_way) so the encoder wins the cores, and SPREAD keeps the
        # actors of a cluster on different nodes.
        threads = max(1, _node_cpus() // count)
        options = {"num_cpus": 0, "scheduling_strategy": "SPREAD"} if streaming else {"num_cpus": threads}
    # No max_restarts: Ray cannot restart an actor whose constructor arguments live in the object store (it
    # logs an error on every start saying so, ray#53727). A crashed actor fails the shards waiting on it; they
    # stay unfinished and a re-run redoes them.
    actors = [TokenizeActor.options(**options).remote(tcfg, threads, calibration, counter) for _ in range(count)]
    try:
        described = ray.get([a.ready.remote() for a in actors])  # a bad codebook fails here, once, with its message
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors, described[0]


@ray.remote
class TokenizeActor:
    """Loads the encoder once; encodes a streaming shard's pixels, or tokenizes a whole finished shard."""

    def __init__(self, tcfg: TokenizeConfig, threads: int, calibration, counter=None):
        """`calibration`: int8's encoder pixels, or a CalibrationCollector to wait for (before the first encode)."""
        import torch

        from pmd_pipeline.tokens.codebook import load_codebook
        from pmd_pipeline.tokens.encoder import DvaeTokenizer, default_batch_size

        torch.set_num_threads(threads)
        codebook = load_codebook(tcfg.codebook, tcfg.seed)
        pixels = calibration if isinstance(calibration, np.ndarray) else None
        self.collector = None if pixels is not None else calibration
        self.tokenizer = DvaeTokenizer(codebook.model, tcfg.precision, calibration=pixels)
        self.identity = tokens_identity(codebook.identity, self.tokenizer.precision)
        self.batch_size = tcfg.batch_size or default_batch_size(self.tokenizer.device)
        self.progress = Reporter(counter, "tokens")

    def ready(self) -> tuple[str, str]:
        """(tokens identity, precision): `auto` resolves on the actor's device, so only it knows."""
        return self.identity, self.tokenizer.precision

    def describe(self) -> tuple[str, str, float | None]:
        """`ready` and int8's agreement with fp32 (known once calibrated)."""
        self._calibrated()
        return self.identity, self.tokenizer.precision, self.tokenizer.int8_agreement

    def calibrate_early(self) -> None:
        """Streaming int8: quantize as soon as the collector has the first images, while the first shard is
        still fetching, not at the first `encode` (once that shard is whole). A failure here is not lost: the
        first `encode` calls `_calibrated` again and raises it in the shard task that asked."""
        try:
            self._calibrated()
        except Exception:  # noqa: BLE001 - raised again by the first encode, where a shard task reports it
            pass

    def _calibrated(self) -> None:
        """int8 streaming: the first actor to get here quantizes on the collector's images and shares the
        ranges; the others make the same model from them (3 s instead of ~30 s of CPU each).
        The actor runs one call at a time: the others queue behind this."""
        if not self.tokenizer.needs_calibration:
            return
        if self.collector is None:
            raise PmdError("dVAE precision int8 needs calibration images and none were given")
        if not ray.get(self.collector.claim.remote()):
            shared = ray.get(self.collector.shared.remote(SHARED_RANGES_WAIT_S))
            if shared is not None:
                self.tokenizer.calibrate_from(*shared)
                return
        try:
            self.tokenizer.calibrate(ray.get(self.collector.calibration.remote()))
        finally:
            done = not self.tokenizer.needs_calibration
            self.collector.share.remote((self.tokenizer.int8_ranges, self.tokenizer.int8_agreement) if done else None)

    def encode(self, pixels: np.ndarray, out: str) -> tuple[np.ndarray, float | None]:
        """uint16 [N, 14, 14] tokens of uint8 [N, 112, 112, 3] pixels (encoder_rgb's), in batches, and int8's
        agreement with fp32 (None in fp32 and bf16)."""
        crash_point("tokens", out)
        self._calibrated()
        grids = []
        for start in range(0, len(pixels), self.batch_size):
            grids.append(self.tokenizer.tokens(encoder_input(pixels[start : start + self.batch_size])))
            self.progress.add(images=len(grids[-1]))
        self.progress.flush()
        return np.concatenate(grids), self.tokenizer.int8_agreement

    def tokenize(self, paths: ShardPaths, force: bool) -> dict:
        from pmd_pipeline.tokens.shard import tokenize_shard

        self._calibrated()
        sidecar = tokenize_shard(paths, self.tokenizer, self.identity, self.batch_size, force)
        self.progress.add(shards=1, images=sidecar.get("samples_tokenized", 0) if not sidecar.get("skipped") else 0)
        self.progress.flush()
        return sidecar
