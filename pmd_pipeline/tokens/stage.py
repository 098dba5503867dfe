"""The token stage on Ray: a pool of actors that each load the dVAE encoder once.

One actor per GPU when the cluster has GPUs; otherwise CPU actors (by default one, using every core:
the encoder's convolutions already use all threads, and a second copy of 54M parameters buys nothing).

In `pmd build` the stage streams: each shard task, once its images are fetched, sends their pixels to an
actor (`ShardTokens.request`) and writes its tar once, with the tokens, while later shards fetch. The token
pass over finished tars (`tokenize_shards`) serves `pmd tokenize OUT` and shards a build finished without
tokens (an earlier `--no-tokenize` run, or int8's calibration shards).
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
    encoder_pixels,
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
    pixels = first_pixels(shards, count)
    if len(pixels) < 2:
        raise PmdError(f"dVAE precision int8 calibrates on the build's images, and it has {len(pixels)}; use fp32")
    return np.stack(pixels)


def first_pixels(shards: list[ShardPaths], count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Encoder pixels of up to `count` decodable images of `shards`, in order."""
    pixels = []
    for paths in shards:
        with paths.tar.open("rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(f".{IMAGE_EXT}"):
                    try:
                        pixels.append(encoder_pixels(tar.extractfile(member).read()))
                    except BadImage:
                        continue
                    if len(pixels) == count:
                        return pixels
    return pixels


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
        grids = ray.get(self.actor.encode.remote(np.stack(pixels), str(out))) if pixels else []
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


class TokenPool:
    """The run's dVAE actors: one per GPU, or CPU actors. In a streaming build (`streaming`) CPU actors
    reserve no Ray CPU and the fetching tasks give way to them; the token pass alone reserves every core."""

    def __init__(self, tcfg: TokenizeConfig, calibration: np.ndarray | None, counter=None, streaming=False):
        if counter is not None:
            counter.add.remote("tokens", {})  # the stage's clock starts now (loading the encoder is part of it)
        self.actors = _start_actors(tcfg, _actor_count(tcfg), calibration, counter, streaming)
        self.counter = counter
        self.on_cpu = not int(ray.cluster_resources().get("GPU", 0))
        self.load = dict.fromkeys(range(len(self.actors)), 0)  # shards handed to each actor and not yet back
        try:
            self.identity, self.precision, self.int8_agreement = ray.get(self.actors[0].describe.remote())
        except BaseException:
            self.close()
            raise

    def target(self) -> tuple[int, ShardTokens]:
        """The least-loaded actor for the next shard (its index: give it back with `done`)."""
        index = min(self.load, key=self.load.get)
        self.load[index] += 1
        actor = self.actors[index]
        return index, ShardTokens(actor, self.identity, self.precision, self.int8_agreement, self.counter, self.on_cpu)

    def done(self, index: int) -> None:
        self.load[index] -= 1

    def close(self) -> None:
        """Every way out (done, a refusal, a full device, a signal) kills the actors: none goes on writing."""
        for actor in self.actors:
            ray.kill(actor)


def _actor_count(tcfg: TokenizeConfig) -> int:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return tcfg.actors or gpus or 1


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
        ray.get([a.ready.remote() for a in actors])  # a bad codebook fails here, once, with its message
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


@ray.remote
class TokenizeActor:
    """Loads the encoder once; encodes a streaming shard's pixels, or tokenizes a whole finished shard."""

    def __init__(self, tcfg: TokenizeConfig, threads: int, calibration: np.ndarray | None, counter=None):
        import torch

        from pmd_pipeline.tokens.codebook import load_codebook
        from pmd_pipeline.tokens.encoder import DvaeTokenizer, default_batch_size

        torch.set_num_threads(threads)
        codebook = load_codebook(tcfg.codebook, tcfg.seed)
        self.tokenizer = DvaeTokenizer(codebook.model, tcfg.precision, calibration=calibration)
        self.identity = tokens_identity(codebook.identity, self.tokenizer.precision)
        self.batch_size = tcfg.batch_size or default_batch_size(self.tokenizer.device)
        self.progress = Reporter(counter, "tokens")

    def ready(self) -> str:
        return self.identity

    def describe(self) -> tuple[str, str, float | None]:
        """(tokens identity, precision, int8 agreement): `auto` resolves on the actor's device, so only it knows."""
        return self.identity, self.tokenizer.precision, self.tokenizer.int8_agreement

    def encode(self, pixels: np.ndarray, out: str) -> np.ndarray:
        """uint16 [N, 14, 14] tokens of uint8 [N, 112, 112, 3] pixels (encoder_rgb's), in batches."""
        crash_point("tokens", out)
        grids = []
        for start in range(0, len(pixels), self.batch_size):
            grids.append(self.tokenizer.tokens(encoder_input(pixels[start : start + self.batch_size])))
            self.progress.add(images=len(grids[-1]))
        self.progress.flush()
        return np.concatenate(grids)

    def tokenize(self, paths: ShardPaths, force: bool) -> dict:
        from pmd_pipeline.tokens.shard import tokenize_shard

        sidecar = tokenize_shard(paths, self.tokenizer, self.identity, self.batch_size, force)
        self.progress.add(shards=1, images=sidecar.get("samples_tokenized", 0) if not sidecar.get("skipped") else 0)
        self.progress.flush()
        return sidecar
