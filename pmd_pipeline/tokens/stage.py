"""The tokenize stage on Ray: a pool of actors that each load the dVAE encoder once and tokenize whole shards.

One actor per GPU when the cluster has GPUs; otherwise CPU actors (by default one, using every core:
the encoder's convolutions already use all threads, and a second copy of 54M parameters buys nothing).
Runs inside `pmd build` after every shard is written, and alone as `pmd tokenize OUT` (build.retokenize).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable

import numpy as np
import ray

from pmd_pipeline.config import TokenizeConfig
from pmd_pipeline.errors import DiskFull, PmdError, StopBuild, is_disk_full
from pmd_pipeline.tokens.codebook import codebook_identity
from pmd_pipeline.tokens.encoder import BadImage, check_precision, encoder_pixels, tokens_identity
from pmd_pipeline.tokens.shard import needs_tokens
from shards.layout import IMAGE_EXT, ShardPaths
from shards.sidecar import read_sidecar

CALIBRATION_IMAGES = 32  # int8: half fit the activation ranges, half measure agreement with fp32

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
                        return np.stack(pixels)
    if len(pixels) < 2:
        raise PmdError(f"dVAE precision int8 calibrates on the build's images, and it has {len(pixels)}; use fp32")
    return np.stack(pixels)


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


def tokenize_shards(
    tcfg: TokenizeConfig,
    todo: list[ShardPaths],
    force: bool = False,
    on_progress: Callable | None = None,
    all_shards: list[ShardPaths] | None = None,
) -> list[str]:
    """Tokenize `todo` on an actor pool; returns the tars that failed (a re-run redoes them).

    `all_shards` (default `todo`): every finished shard of the build, where int8 finds its calibration images.
    """
    if not todo:
        return []
    all_shards = all_shards or todo
    calibration = calibration_pixels(all_shards) if tcfg.precision == "int8" else None
    actors = _start_actors(tcfg, min(len(todo), _actor_count(tcfg)), calibration)
    try:  # every way out (done, a refusal, a full device, a signal) kills the actors: none goes on writing
        # `auto` resolves on the actors' device, so only now is the precision known
        refuse_mixed_precision(all_shards, ray.get(actors[0].precision.remote()), force)
        return _run_pool(actors, todo, force, on_progress)
    finally:
        for actor in actors:
            ray.kill(actor)


def _run_pool(actors: list, todo: list[ShardPaths], force: bool, on_progress: Callable | None) -> list[str]:
    failed: list[str] = []
    queue = list(reversed(todo))
    in_flight: dict = {}
    done = 0
    while queue or in_flight:
        for actor in actors:
            if queue and actor not in in_flight.values():
                paths = queue.pop()
                in_flight[actor.tokenize.remote(paths, force)] = actor
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        in_flight.pop(ready[0])
        done += 1
        try:
            ray.get(ready[0])
        except StopBuild:  # a link in OUT: every shard would meet it
            raise
        except ray.exceptions.RayError as err:
            if is_disk_full(err):  # stop once, not one failure per shard
                raise DiskFull(f"no space left on the output device: {str(err).splitlines()[0]}") from None
            log.error("tokenizing failed: %s", err)
            failed.append(str(err).splitlines()[0])
        if on_progress:
            on_progress(done, len(todo))
    return failed


def _actor_count(tcfg: TokenizeConfig) -> int:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return tcfg.actors or gpus or 1


def _start_actors(tcfg: TokenizeConfig, count: int, calibration: np.ndarray | None) -> list:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = 1
    else:
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // count)
        options = {"num_cpus": threads}
    actors = [TokenizeActor.options(**options).remote(tcfg, threads, calibration) for _ in range(count)]
    ray.get([a.ready.remote() for a in actors])  # a bad codebook fails here, once, with its message
    return actors


@ray.remote
class TokenizeActor:
    """Loads the encoder once and tokenizes whole shards with it."""

    def __init__(self, tcfg: TokenizeConfig, threads: int, calibration: np.ndarray | None):
        import torch

        from pmd_pipeline.tokens.codebook import load_codebook
        from pmd_pipeline.tokens.encoder import DvaeTokenizer, default_batch_size

        torch.set_num_threads(threads)
        codebook = load_codebook(tcfg.codebook, tcfg.seed)
        self.tokenizer = DvaeTokenizer(codebook.model, tcfg.precision, calibration=calibration)
        self.identity = tokens_identity(codebook.identity, self.tokenizer.precision)
        self.batch_size = tcfg.batch_size or default_batch_size(self.tokenizer.device)

    def ready(self) -> str:
        return self.identity

    def precision(self) -> str:
        return self.tokenizer.precision

    def tokenize(self, paths: ShardPaths, force: bool) -> dict:
        from pmd_pipeline.tokens.shard import tokenize_shard

        return tokenize_shard(paths, self.tokenizer, self.identity, self.batch_size, force)
