"""`pmd build`: plan every source, then process shards as Ray tasks (bounded, retried, resumable), then the manifest.

Also `pmd tokenize OUT` (retokenize): the token stage alone over a finished build. Both run on the Ray instance
the CLI started or joined.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import ray

from filters import build_filters
from pmd_pipeline.config import BuildConfig
from pmd_pipeline.errors import DiskFull, PmdError, StopBuild, is_disk_full
from pmd_pipeline.faults import crash_point
from pmd_pipeline.fetch.metadata import is_url
from pmd_pipeline.manifest import write_manifest
from pmd_pipeline.output import claim_output, save_tokenize_settings, saved_config
from pmd_pipeline.plan import plan_source
from pmd_pipeline.process import filter_chain, process_shard
from pmd_pipeline.storage import as_path, local_scratch
from pmd_pipeline.tokens.stage import shards_to_tokenize, tokenize_shards
from shards.files import owned_path
from shards.layout import WORK_FOLDER, ShardPaths, finished_shards
from sources import get_source
from sources.base import require_files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildResult:
    shards_total: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    shards_done: int = 0
    shards_failed: list[str] = dataclasses.field(default_factory=list)
    sources_failed: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> why it could not be read
    manifest: dict | None = None

    @property
    def failed(self) -> bool:
        return bool(self.shards_failed or self.sources_failed)


def build(cfg: BuildConfig, on_progress: Callable[[int, int], None] | None = None) -> BuildResult:
    """Run the whole build on the Ray instance this process is connected to (the CLI starts or joins one)."""
    if not ray.is_initialized():
        raise PmdError("build() needs a running Ray: connect first (the `pmd build` command starts or joins one)")
    if not cfg.enabled_sources():
        raise PmdError("the config enables no source; add a [sources.<name>] table (see `pmd sources`)")
    claim_output(cfg)
    if cfg.tokenize.enabled:  # refuse a codebook other than the one already in OUT before any work
        shards_to_tokenize(finished_shards(as_path(cfg.out)), cfg.tokenize)
    result = BuildResult()
    plans = _plan_sources(cfg, result)
    shards = [ShardPaths(as_path(cfg.out), p["source"], i) for p in plans for i in range(p["shards"])]
    result.shards_total = len(shards)
    todo = [s for s in shards if not s.is_done()]
    result.shards_skipped = len(shards) - len(todo)
    _run_shards(cfg, todo, result, on_progress)
    if result.failed:
        return result  # no manifest for an incomplete build; re-running finishes it
    if cfg.tokenize.enabled:  # only shards without tokens of this codebook
        todo = shards_to_tokenize(shards, cfg.tokenize)
        result.shards_failed += tokenize_shards(cfg.tokenize, todo, all_shards=shards)
    if result.failed:
        return result
    crash_point("manifest", cfg.out)
    result.manifest = write_manifest(cfg)
    out = as_path(cfg.out)
    shutil.rmtree(owned_path(out, local_scratch(out, WORK_FOLDER)), ignore_errors=True)
    return result


def retokenize(
    out: Path, codebook: str | None = None, force: bool = False, on_progress=None, precision: str | None = None
) -> dict:
    """`pmd tokenize OUT`: add (or, with force, redo) tokens in every finished shard, then rewrite the manifest."""
    cfg = saved_config(out)
    if codebook is not None:
        cfg.tokenize.codebook = str(Path(codebook).expanduser().resolve()) if codebook else ""
    if precision is not None:
        cfg.tokenize.precision = precision
    shards = finished_shards(out)
    if not shards:
        raise PmdError(f"{out} has no finished shards to tokenize; run `pmd build` first")
    todo = shards_to_tokenize(shards, cfg.tokenize, force)
    failed = tokenize_shards(cfg.tokenize, todo, force, on_progress, all_shards=shards)
    if failed:
        return {"shards": len(shards), "tokenized": len(todo) - len(failed), "failed": failed, "manifest": None}
    save_tokenize_settings(cfg)
    return {"shards": len(shards), "tokenized": len(todo), "failed": [], "manifest": write_manifest(cfg)}


def _plan_sources(cfg: BuildConfig, result: BuildResult) -> list[dict]:
    """Plan every source; one whose input cannot be read fails alone, with its message, and the rest go on."""
    sources = cfg.enabled_sources()
    refs = [_plan_task.remote(cfg, s) for s in sources]
    plans = []
    try:
        for source_cfg, ref in zip(sources, refs, strict=True):
            try:
                plans.append(ray.get(ref))
            except StopBuild:  # a full device or a link in OUT: the whole build stops, not this source alone
                raise
            except PmdError as err:  # Ray re-raises the task's own exception type
                message = str(err).strip().splitlines()[-1]
                result.sources_failed[source_cfg.name] = message.removeprefix(f"{PmdError.__module__}.PmdError: ")
    except BaseException:  # stopped (a signal, a full device, a refusal): no task of this run goes on writing
        cancel(refs)
        raise
    return plans


@ray.remote(num_cpus=1)
def _plan_task(cfg: BuildConfig, source_cfg) -> dict:
    try:
        return plan_source(cfg, source_cfg)
    except Exception as err:
        if is_disk_full(err) and not isinstance(err, DiskFull):
            raise DiskFull(f"no space left on the output device: {err}") from None
        raise


@ray.remote(num_cpus=1)
def _shard_task(cfg: BuildConfig, paths: ShardPaths) -> dict | StopBuild:
    """One shard; a StopBuild (full device, link in OUT) is returned, not raised: Ray would retry it in vain."""
    try:
        return process_shard(cfg, paths, node=ray.get_runtime_context().get_node_id())
    except StopBuild as err:
        return err
    except Exception as err:
        if is_disk_full(err):
            return DiskFull(f"no space left on the output device writing {paths.tar}: {err}")
        raise


def cancel(refs) -> None:
    """Cancel this run's tasks still in flight (force: a task sleeping in I/O stops now); done ones are kept."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - finished, or its worker already gone: nothing left to stop
            pass


def _run_shards(cfg: BuildConfig, todo: list[ShardPaths], result: BuildResult, on_progress) -> None:
    """Keep at most `max_in_flight` shard tasks running; Ray retries each failed task `shard_retries` times."""
    limit = cfg.run.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    # SPREAD: a crawl is network-bound, so shards go to every node rather than filling the first one.
    task = _shard_task.options(max_retries=cfg.run.shard_retries, retry_exceptions=True, scheduling_strategy="SPREAD")
    queue = list(reversed(todo))
    in_flight: dict = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                paths = queue.pop()
                in_flight[task.remote(cfg, paths)] = paths
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            paths = in_flight.pop(ready[0])
            _collect(ready[0], paths, result)
            if on_progress:
                on_progress(result.shards_done + len(result.shards_failed), len(todo))
    except BaseException:  # stopped (a signal, a full device, a link in OUT): no shard task goes on writing
        cancel(in_flight)
        raise


def _collect(ref, paths: ShardPaths, result: BuildResult) -> None:
    try:
        value = ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as err:
        log.error("shard %s failed after retries: %s", paths.tar, err)
        result.shards_failed.append(str(paths.tar))
        return
    if isinstance(value, StopBuild):
        raise value
    result.shards_done += 1


def validate(cfg: BuildConfig) -> None:
    """Fail at once, before any work, on unknown names and missing inputs."""
    build_filters(cfg.filters)
    for source_cfg in cfg.enabled_sources():
        source = get_source(source_cfg.name)
        build_filters(filter_chain(cfg, source_cfg.name))
        local_files = [p for p in source_cfg.metadata if not is_url(p)]
        require_files(dataclasses.replace(source_cfg, metadata=local_files), minimum=_minimum_files(source_cfg, source))
        for role, archive in source_cfg.images.items():
            if not as_path(archive).exists():
                raise PmdError(f"source {source_cfg.name}: image archive `{role}` not found: {archive}")


def _minimum_files(source_cfg, source) -> int:
    """Metadata URLs are checked when downloaded; a source read from its images alone needs none."""
    return 0 if source_cfg.metadata or not source.needs_metadata else 1
