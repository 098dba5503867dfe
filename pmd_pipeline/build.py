"""`pmd build`: download the files the config names by URL, plan every source, then stream shards through Ray
(fetch tasks on CPUs, dVAE tokens on an actor pool, each tar written once; bounded, retried, resumable), then the
manifest.

Also `pmd tokenize OUT` (retokenize): the token pass alone over a finished build. Both run on the Ray instance
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
from pmd_pipeline.fetch.downloads import download_all, is_url, localized, split_member
from pmd_pipeline.manifest import write_manifest
from pmd_pipeline.output import claim_output, save_tokenize_settings, saved_config
from pmd_pipeline.plan import plan_source
from pmd_pipeline.process import filter_chain, process_shard
from pmd_pipeline.progress import ProgressCounter, Reporter, Snapshot, Watch
from pmd_pipeline.storage import as_path, local_scratch
from pmd_pipeline.tokens.stage import (
    ShardTokens,
    TokenPool,
    calibration_pixels,
    refuse_mixed_precision,
    shards_to_tokenize,
    start_calibration,
    tokenize_shards,
)
from shards.files import owned_path
from shards.layout import WORK_FOLDER, ShardPaths, finished_shards
from sources import get_source
from sources.base import require_files
from sources.published import MANUAL_STEPS, manual_step_message

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildResult:
    shards_total: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    shards_done: int = 0
    shards_failed: list[str] = dataclasses.field(default_factory=list)
    sources_failed: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> why it could not be read
    manifest: dict | None = None
    progress: Snapshot | None = None  # this run's counts and stage times, at the end

    @property
    def failed(self) -> bool:
        return bool(self.shards_failed or self.sources_failed)


def build(cfg: BuildConfig, on_progress: Callable[[Snapshot], None] | None = None) -> BuildResult:
    """Run the whole build on the Ray instance this process is connected to (the CLI starts or joins one).

    `on_progress(snapshot)` is called about twice a second with this run's counts (pmd_pipeline.progress)."""
    if not ray.is_initialized():
        raise PmdError("build() needs a running Ray: connect first (the `pmd build` command starts or joins one)")
    if not cfg.enabled_sources():
        raise PmdError("the config enables no source; add a [sources.<name>] table (see `pmd sources`)")
    claim_output(cfg)
    if cfg.tokenize.enabled:  # refuse a codebook other than the one already in OUT before any work
        shards_to_tokenize(finished_shards(as_path(cfg.out)), cfg.tokenize)
    counter = ProgressCounter.remote()
    counter.set_totals.remote(tokens=int(cfg.tokenize.enabled))  # the display has a token line from the start
    watch = Watch(counter, on_progress)
    result = BuildResult()
    try:
        _build(cfg, result, counter, watch)
        result.progress = watch.snapshot()
        if on_progress:
            on_progress(result.progress)  # the display's last view holds the final counts
    finally:
        ray.kill(counter)
    return result


def _build(cfg: BuildConfig, result: BuildResult, counter, watch: Watch) -> None:
    sources = cfg.enabled_sources()
    result.sources_failed.update(download_all(cfg, sources, counter, watch))  # before the plan: it reads them
    # The plan reads the downloaded copies; `cfg` itself keeps the URLs (its hash, config.json, the manifest).
    sources = [localized(cfg, s) for s in sources if s.name not in result.sources_failed]
    plans = _plan_sources(cfg, sources, result, counter, watch)
    shards = [ShardPaths(as_path(cfg.out), p["source"], i) for p in plans for i in range(p["shards"])]
    result.shards_total = len(shards)
    todo = [s for s in shards if not s.is_done()]
    result.shards_skipped = len(shards) - len(todo)
    rows = {p["source"]: p["rows"] for p in plans}
    planned = sum(min(cfg.shard_size, rows[s.source] - s.index * cfg.shard_size) for s in todo)
    counter.set_totals.remote(shards=len(todo), images=planned)
    if not cfg.tokenize.enabled:
        _run_shards(cfg, todo, result, None, counter, watch)
    else:
        _build_with_tokens(cfg, shards, todo, result, counter, watch)
    if result.failed:
        return  # no manifest for an incomplete build; re-running finishes it
    crash_point("manifest", cfg.out)
    result.manifest = write_manifest(cfg)
    out = as_path(cfg.out)
    shutil.rmtree(owned_path(out, local_scratch(out, WORK_FOLDER)), ignore_errors=True)


def _build_with_tokens(cfg: BuildConfig, shards, todo, result: BuildResult, counter, watch: Watch) -> None:
    """Shards stream through the token actors; those finished without tokens get the token pass after."""
    if not todo and not shards_to_tokenize(shards, cfg.tokenize):
        return  # a finished build re-run: no encoder to load
    # int8 calibrates on the build's first images: gathered as they are fetched, while later shards fetch
    collector = start_calibration(shards) if cfg.tokenize.precision == "int8" else None
    pool = TokenPool(cfg.tokenize, None, counter, streaming=bool(todo), collector=collector)
    try:
        refuse_mixed_precision(shards, pool.precision, force=False)
        _run_shards(cfg, todo, result, pool, counter, watch, order={s.tar: i for i, s in enumerate(shards)})
        if not result.failed:  # e.g. an earlier --no-tokenize run's shards
            result.shards_failed += tokenize_shards(pool, shards_to_tokenize(shards, cfg.tokenize), on_wait=watch)
    finally:
        pool.close()
        if collector is not None:
            ray.kill(collector)


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
    failed = _token_pass(cfg, shards, todo, force, on_progress)
    if failed:
        return {"shards": len(shards), "tokenized": len(todo) - len(failed), "failed": failed, "manifest": None}
    save_tokenize_settings(cfg)
    return {"shards": len(shards), "tokenized": len(todo), "failed": [], "manifest": write_manifest(cfg)}


def _token_pass(cfg: BuildConfig, shards, todo, force: bool, on_progress) -> list[str]:
    if not todo:
        return []
    calibration = calibration_pixels(shards) if cfg.tokenize.precision == "int8" else None
    counter = ProgressCounter.remote()
    counter.set_totals.remote(shards=len(todo), tokens=1)
    try:
        pool = TokenPool(cfg.tokenize, calibration, counter)
        try:
            refuse_mixed_precision(shards, pool.precision, force)
            watch = Watch(counter, on_progress)
            failed = tokenize_shards(pool, todo, force, on_wait=watch)
            if on_progress:
                on_progress(watch.snapshot())  # the display's last view holds the final counts
            return failed
        finally:
            pool.close()
    finally:
        ray.kill(counter)


def _plan_sources(cfg: BuildConfig, sources, result: BuildResult, counter, watch: Watch) -> list[dict]:
    """Plan every source; one whose input cannot be read fails alone, with its message, and the rest go on."""
    if not sources:
        return []  # every source failed its downloads
    counter.set_totals.remote(sources=len(sources))
    counter.add.remote("plan", {})  # the stage's clock starts now
    refs = [_plan_task.remote(cfg, s, counter) for s in sources]
    plans = []
    try:
        while ray.wait(refs, num_returns=len(refs), timeout=1.0)[1]:
            watch()
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
def _plan_task(cfg: BuildConfig, source_cfg, counter) -> dict:
    progress = Reporter(counter, "plan")
    try:
        plan = plan_source(cfg, source_cfg, on_rows=lambda n: progress.add(images=n))
        progress.add(shards=1)  # a source planned
        return plan
    except Exception as err:
        if is_disk_full(err) and not isinstance(err, DiskFull):
            raise DiskFull(f"no space left on the output device: {err}") from None
        raise
    finally:
        progress.flush()


@ray.remote(num_cpus=1)
def _shard_task(cfg: BuildConfig, paths: ShardPaths, tokens: ShardTokens | None, counter) -> dict | StopBuild:
    """One shard; a StopBuild (full device, link in OUT) is returned, not raised: Ray would retry it in vain."""
    try:
        return process_shard(cfg, paths, ray.get_runtime_context().get_node_id(), tokens, counter)
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


def _run_shards(
    cfg: BuildConfig, todo: list[ShardPaths], result: BuildResult, pool, counter, watch: Watch, order=None
) -> None:
    """Keep at most `max_in_flight` shard tasks running (the bound on memory: each holds at most one shard's
    images); Ray retries each failed task `shard_retries` times. With a TokenPool, each shard's images go to
    its least-loaded actor as soon as they are fetched; `order` gives each shard's place in plan order."""
    limit = cfg.run.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    # SPREAD: a crawl is network-bound, so shards go to every node rather than filling the first one.
    task = _shard_task.options(max_retries=cfg.run.shard_retries, retry_exceptions=True, scheduling_strategy="SPREAD")
    queue = list(reversed(todo))
    in_flight: dict = {}
    counter.add.remote("fetch", {})  # the stage's clock starts now
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                paths = queue.pop()
                actor, tokens = pool.target(order[paths.tar] if order else 0) if pool else (None, None)
                in_flight[task.remote(cfg, paths, tokens, counter)] = (paths, actor)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            watch()
            if not ready:
                continue
            paths, actor = in_flight.pop(ready[0])
            if pool:
                pool.done(actor)
            if not _collect(ready[0], paths, result) and pool and pool.stalled_by(order[paths.tar] if order else 0):
                log.error("int8 calibrates on the build's first images and %s failed: stopping here", paths.tar)
                cancel(in_flight)  # they wait for a calibration that cannot come; a re-run goes on
                return
    except BaseException:  # stopped (a signal, a full device, a link in OUT): no shard task goes on writing
        cancel(in_flight)
        raise


def _collect(ref, paths: ShardPaths, result: BuildResult) -> bool:
    """Count the shard task's outcome; False when it failed."""
    try:
        value = ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as err:
        log.error("shard %s failed after retries: %s", paths.tar, err)
        result.shards_failed.append(str(paths.tar))
        return False
    if isinstance(value, StopBuild):
        raise value
    result.shards_done += 1
    return True


def validate(cfg: BuildConfig) -> None:
    """Fail at once, before any work, on unknown names and missing inputs. Sources whose files need a manual
    step (an agreement, a form) are all named at once, each with what to get, from where and where to put it."""
    build_filters(cfg.filters)
    manual_steps = []
    for source_cfg in cfg.enabled_sources():
        build_filters(filter_chain(cfg, source_cfg.name))
        missing = _missing_input(source_cfg)
        if missing is None:
            continue
        if source_cfg.name not in MANUAL_STEPS:
            raise PmdError(missing[1])
        manual_steps.append(manual_step_message(source_cfg.name, missing[0]))
    if manual_steps:
        raise PmdError("\n".join(manual_steps))


def _missing_input(source_cfg) -> tuple[str, str] | None:
    """(the missing local file, the error saying so), or None when every local input is there. URLs are
    checked when downloaded."""
    source = get_source(source_cfg.name)
    local_files = [p for p in source_cfg.metadata if not is_url(p)]
    try:
        require_files(dataclasses.replace(source_cfg, metadata=local_files), minimum=_minimum_files(source_cfg, source))
    except PmdError as err:
        return next((p for p in local_files if not _exists(p)), "its metadata"), str(err)
    for role, archive in source_cfg.images.items():
        if not is_url(archive) and not as_path(archive).exists():
            return archive, f"source {source_cfg.name}: image archive `{role}` not found: {archive}"
    return None


def _exists(entry: str) -> bool:
    return as_path(split_member(entry)[0]).exists()


def _minimum_files(source_cfg, source) -> int:
    """Metadata URLs are checked when downloaded; a source read from its images alone needs none."""
    return 0 if source_cfg.metadata or not source.needs_metadata else 1
