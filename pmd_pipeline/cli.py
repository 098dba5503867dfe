"""The `pmd` command: one verb per subcommand (build, sources, stats, show, verify, tokenize, pretrain, eval, export).

This layer alone starts or joins Ray (`start_ray`); the stages below it run on whatever instance it made.
It also owns how a run ends: one line per problem (exit 2), and SIGINT/SIGTERM stop a build cleanly (130/143).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pmd_pipeline.config import BuildConfig
from pmd_pipeline.config_file import load_config
from pmd_pipeline.errors import PmdError, is_disk_full
from pmd_pipeline.storage import as_path, check_readable, check_writable, is_remote, url_of

app = typer.Typer(help="Rebuild PMD as webdataset shards and pretrain FLAVA on them.", no_args_is_help=True)
# soft_wrap: every message stays one line; rich breaks lines at the console width otherwise (80 columns
# off a terminal: a log, CI), splitting paths and commands a reader copies or greps for
console = Console(stderr=True, soft_wrap=True)


def main() -> None:
    app()


@app.command()
def build(
    config: Path = typer.Option(None, "--config", "-c", help="TOML build config; none = the embedded default sample."),
    out: str = typer.Option(
        None, "--out", "-o", help="Output folder or bucket URL, e.g. s3://bucket/pmd (overrides the config's `out`)."
    ),
    mirror: str = typer.Option(None, help="URL prefix replacing scheme+host of every image URL (a cache or mirror)."),
    allow_host: list[str] = typer.Option(
        None,
        help="A host:port that may resolve to a private/loopback address (your mirror or cache); a bare host allows"
        " ports 80 and 443 only. Repeatable.",
    ),
    ray_address: str = typer.Option(None, help="Join this Ray cluster instead of starting a local one."),
    workers: int = typer.Option(None, help="CPUs of the local Ray instance (default: all cores)."),
    no_tokenize: bool = typer.Option(
        False,
        "--no-tokenize",
        help="Skip the dVAE token stage (add tokens later with `pmd tokenize OUT`, e.g. on a GPU).",
    ),
    codebook: Path = typer.Option(
        None, help="dVAE encoder: HF FlavaImageCodebook folder or DALL-E encoder.pkl (overrides [tokenize] codebook)."
    ),
    precision: str = typer.Option(None, help="dVAE precision: auto, fp32, bf16 or int8 (overrides [tokenize])."),
    progress_every: int = typer.Option(
        None, help="When stderr is not a terminal: a progress line every this many seconds (0 = none; [run]).", min=0
    ),
) -> None:
    """Build shards: plan -> filter -> fetch -> write -> manifest. Re-running resumes; finished shards are kept."""
    with _errors_as_messages(), _stops_cleanly("build"):
        cfg = _build_config(config, out)
        check_writable(as_path(cfg.out))  # a missing bucket or a denied write stops here, in one line
        if mirror is not None:
            cfg.fetch.mirror = mirror
        cfg.fetch.allowed_private_hosts.extend(h.lower() for h in allow_host or [])
        if no_tokenize:
            cfg.tokenize.enabled = False
        if codebook is not None:
            cfg.tokenize.codebook = str(codebook.expanduser().resolve())
        if precision is not None:
            cfg.tokenize.precision = precision
        if ray_address is not None:
            cfg.run.ray_address = ray_address
        if workers is not None:
            cfg.run.num_cpus = workers
        if progress_every is not None:
            cfg.run.progress_every_s = progress_every
        from pmd_pipeline.output import lock_output

        with (
            lock_output(as_path(cfg.out)),
            _disk_full_once(as_path(cfg.out)),
            _ray_down_on_failure(),
            _embedded_mirror(cfg, embedded=config is None),
        ):
            result = _run_build(cfg)
        _report_build(cfg, result)
        if result.failed:
            raise typer.Exit(1)


def _build_config(config: Path | None, out: str | None) -> BuildConfig:
    if config is None:
        from pmd_pipeline.embedded import default_config

        return default_config(out or "pmd_out")
    cfg = load_config(config)
    if out is not None:
        cfg.out = resolve_out(out)
    return cfg


@contextlib.contextmanager
def _embedded_mirror(cfg: BuildConfig, embedded: bool):
    """The embedded default serves its URL images from OUT/_embedded/mirror on 127.0.0.1 while it builds."""
    if not embedded:
        yield
        return
    from pmd_pipeline.embedded import materialize
    from pmd_pipeline.fetch.mirror import StaticServer, use_mirror
    from pmd_pipeline.output import claim_output

    claim_output(cfg)
    root = materialize(cfg.out)
    with StaticServer(root / "mirror") as server:
        use_mirror(cfg.fetch, server.url)  # the one local host this build may fetch from
        yield


def _run_build(cfg: BuildConfig):
    from pmd_pipeline.build import build as run_build
    from pmd_pipeline.build import validate
    from pmd_pipeline.output import claim_output

    validate(cfg)
    claim_output(cfg)  # before the progress bar, so a refusal is one clean line
    start_ray(cfg)
    from pmd_pipeline.progress import BuildDisplay

    with BuildDisplay(console, cfg.run.progress_every_s) as display:
        return run_build(cfg, on_progress=display.show)


def resolve_out(out: str) -> str:
    """--out as given for a URL (s3://bucket/pmd), else an absolute local path."""
    path = as_path(out)
    return url_of(path) if is_remote(path) else str(path.expanduser().resolve())


def build_output(out: str) -> Path:
    """A build output folder to read (stats, show, verify, tokenize), or a one-line error."""
    path = as_path(out)
    check_readable(path)
    if not is_remote(path) and not path.is_dir():
        raise PmdError(f"{out} is not a pmd build output (no such folder); give the --out of a `pmd build`")
    return path


def start_ray(cfg: BuildConfig) -> None:
    """Join the configured cluster, or start a local Ray without the dashboard (once per process)."""
    import ray

    if ray.is_initialized():
        return
    # PMD_* variables (crash points, the real-data folder) reach the workers of a cluster we join too.
    pmd_env = {k: v for k, v in os.environ.items() if k.startswith("PMD_")}
    runtime_env = {"env_vars": pmd_env} if pmd_env else None
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:  # "local": a new instance of our own, even when `ray start` left a cluster on this machine
        keep_token_auth()
        ray.init(
            address="local",
            num_cpus=cfg.run.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
    _stopping.ray_started = True
    if _stopping.active:  # ray.init put its own SIGTERM handlers in place (one aborts with a stack dump)
        _install_stop_handlers()


RAY_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


def keep_token_auth() -> None:
    """A local Ray keeps Ray's token authentication (its default since 2.52: its ports listen on the machine's
    address, and without a token anyone who reaches them runs code as this user); only the notice Ray logs
    about it on every start is dropped. Nothing else changes: the token is Ray's own (~/.ray/auth_token,
    created by Ray if missing), a RAY_AUTH_MODE the user set is obeyed, and joining a cluster is untouched."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in notices.filters):
        notices.addFilter(_DropTokenNotice())


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RAY_TOKEN_NOTICE not in record.getMessage()


def _report_build(cfg: BuildConfig, result) -> None:
    from pmd_pipeline.progress import summary_lines

    if result.progress:
        for line in summary_lines(result.progress):
            console.print(line, markup=False, highlight=False)
    console.print(
        f"[bold]{escape(str(cfg.out))}[/]: {result.shards_total} shards, {result.shards_done} built now, "
        f"{result.shards_skipped} already finished, {len(result.shards_failed)} failed"
    )
    for source, why in result.sources_failed.items():
        console.print(f"[red]source {source} failed:[/] {escape(str(why))}", highlight=False)
    for shard in result.shards_failed:
        console.print(f"[red]failed:[/] {escape(str(shard))} (re-run the same command to retry it)", highlight=False)
    if result.manifest:
        totals = result.manifest["totals"]
        console.print(
            f"{totals['samples_written']} samples, {totals['pairs_written']} pairs from {totals['rows_in']} rows "
            f"({totals['rejected_raw_records']} malformed raw records kept aside). `pmd stats {cfg.out}` for more."
        )
        _say_tokens(result.manifest, cfg.out)


def _say_tokens(manifest: dict, out) -> None:
    """Random-codebook tokens are placeholders: say so at the end of every run that made or kept them."""
    if (manifest.get("tokens") or {}).get("random"):
        console.print(
            "[yellow]note:[/] the dVAE tokens come from a random seeded codebook: placeholders that test the "
            "pipeline, not DALL-E tokens. Add real ones with "
            f"`pmd tokenize {escape(str(out))} --codebook PATH --force`.",
            highlight=False,
        )


@app.command()
def sources() -> None:
    """List every registered source: raw files, images, rules, licence, the paper's counts, where it is published."""
    from sources import REGISTRY, paper_group_members, paper_total
    from sources.published import MANUAL_STEPS, PUBLISHED

    out = Console()
    for name, source in sorted(REGISTRY.items()):
        i = source.info
        paper = f"{i.paper_pairs:g}M pairs, {i.paper_avg_words:g} words/caption in FLAVA's Table 2"
        if i.paper_group:
            paper += f" (for the {len(paper_group_members(i.paper_group))} {i.paper_group} subsets together)"
        out.print(f"[bold]{name}[/]  {i.title}: {paper}")
        for label, value in (
            ("raw files", i.raw_files),
            ("images", i.images_from),
            ("rules", i.rules),
            ("licence", i.license),
            *(("published", url) for url in PUBLISHED.get(name, [])),
            *([("manual", MANUAL_STEPS[name])] if name in MANUAL_STEPS else []),
        ):
            out.print(f"  {label:10} {value}", highlight=False)
    total = paper_total(REGISTRY)
    out.print(
        f"[bold]total[/]  PMD in FLAVA's Table 2: {total['pairs_millions']:g}M pairs "
        "(each figure counted once: the Localized Narratives subsets share one)",
        highlight=False,
    )


@app.command()
def plan(
    config: Path = typer.Argument(None, help="TOML build config; none = the embedded default sample."),
    out: str = typer.Option(None, "--out", "-o", help="Where the build will write (overrides the config's `out`)."),
    nodes: int = typer.Option(1, min=1, help="Nodes of the cluster to estimate hours for."),
    cpus: int = typer.Option(32, min=1, help="CPUs per node."),
    gpus: int = typer.Option(0, min=0, help="GPUs per node (the dVAE tokens run there)."),
    download_mb_s: float = typer.Option(100.0, min=0.001, help="Download speed per node, MB/s."),
    sample_rows: int = typer.Option(2000, min=1, help="Rows of each source's metadata the rules are run on."),
    count: bool = typer.Option(
        False, "--count", help="Download the metadata given as URLs into OUT to count rows (no image archive)."
    ),
    mirror: str = typer.Option(None, help="URL prefix replacing scheme+host of every URL (a cache or mirror)."),
    allow_host: list[str] = typer.Option(None, help="A host:port that may resolve to a private address. Repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """A dry run: per source, files and sizes, rows, expected pairs, shards, output bytes, disk and hours."""
    from pmd_pipeline.estimate import Cluster, plan_config
    from pmd_pipeline.inspection.plan_view import show_plan

    with _errors_as_messages():
        cfg = _build_config(config, out)
        if mirror is not None:
            cfg.fetch.mirror = mirror
        cfg.fetch.allowed_private_hosts.extend(h.lower() for h in allow_host or [])
        with _embedded_mirror(cfg, embedded=config is None):  # the sample is materialized in OUT to be counted
            counted = count or config is None  # the embedded sample is small: always counted
            report = plan_config(cfg, Cluster(nodes, cpus, gpus, download_mb_s), sample_rows, counted)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            show_plan(report, Console())


@app.command()
def stats(
    out: str = typer.Argument(..., help="A build output folder or bucket URL (s3://bucket/pmd)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    source: str = typer.Option(None, help="Only this source."),
    plots: Path = typer.Option(None, "--plots", help="Also write PNG charts into this folder."),
    sample_shards: int = typer.Option(64, help="Shards per source whose parquet feeds medians/percentiles (0 = all)."),
    codes: bool = typer.Option(False, "--codes", help="Also read the 8192 dVAE code counts: codes used, top codes."),
    wide: bool = typer.Option(False, "--wide", help="Every column: raw rows, failure and drop reasons, codebooks."),
) -> None:
    """Per-source and total statistics of a build, read from the shard stats/parquet files (never the tars)."""
    from pmd_pipeline.inspection.stats_view import run_stats

    with _errors_as_messages():
        run_stats(build_output(out), source, as_json, plots, sample_shards, codes, wide)


@app.command()
def show(
    out: str = typer.Argument(..., help="A build output folder or bucket URL (s3://bucket/pmd)."),
    key: str = typer.Argument(None, help="A sample key; omit it to show the first --n samples of --source."),
    source: str = typer.Option(None, help="Show samples of this source (default: the first source)."),
    n: int = typer.Option(5, "--n", help="How many samples to show."),
    to: Path = typer.Option(Path("pmd_show"), "--to", help="Folder for the images and token grids."),
) -> None:
    """Print samples (key, captions, source, url, licence, size); write their images and 14x14 token grids."""
    from pmd_pipeline.inspection.show import run_show

    with _errors_as_messages():
        run_show(build_output(out), key, source, n, to)


@app.command()
def verify(
    out: str = typer.Argument(..., help="A build output folder or bucket URL (s3://bucket/pmd)."),
    source: str = typer.Option(None, help="Only this source."),
) -> None:
    """Re-read every tar: complete samples, counts and sha256 vs the manifest; write sizes.json and wids indexes."""
    from pmd_pipeline.inspection.verify import run_verify

    with _errors_as_messages():
        if not run_verify(build_output(out), source):
            raise typer.Exit(1)


@app.command()
def tokenize(
    out: str = typer.Argument(..., help="A build output folder or bucket URL (s3://bucket/pmd)."),
    codebook: str = typer.Option(
        None, help="HF FlavaImageCodebook folder or DALL-E encoder.pkl ('' = random, seeded); default: the build's."
    ),
    force: bool = typer.Option(False, "--force", help="Redo every shard, also those tokenized with another codebook."),
    precision: str = typer.Option(None, help="auto, fp32, bf16 or int8; default: the build's [tokenize] precision."),
) -> None:
    """Add dVAE image tokens (KEY.dvae.npy) to every finished shard, without re-downloading; rewrites the manifest."""
    with _errors_as_messages(), _stops_cleanly("tokenize"):
        if not _tokenize(out, codebook, force, precision):
            raise typer.Exit(1)


def _tokenize(out_url: str, codebook: str | None, force: bool, precision: str | None) -> bool:
    """Run the token stage on a local Ray (or the build's cluster) and report; False when some shard failed."""
    from pmd_pipeline.output import lock_output, saved_config

    out = build_output(out_url)
    cfg = saved_config(out)  # read first: a wrong folder is refused before Ray starts, and gets no lock file
    with lock_output(out), _disk_full_once(out), _ray_down_on_failure():  # a build or tokenize running now: refused
        start_ray(cfg)
        return _run_tokenize(out, codebook, force, precision)


def _run_tokenize(out: Path, codebook: str | None, force: bool, precision: str | None) -> bool:
    from pmd_pipeline.build import retokenize
    from pmd_pipeline.output import saved_config
    from pmd_pipeline.progress import BuildDisplay

    with BuildDisplay(console, saved_config(out).run.progress_every_s) as display:
        result = retokenize(out, codebook, force, display.show, precision)
    for failure in result["failed"]:
        console.print(f"[red]failed:[/] {escape(failure)} (re-run the same command to retry)", highlight=False)
    console.print(f"[bold]{escape(str(out))}[/]: {result['shards']} shards, {result['tokenized']} tokenized now")
    if result["manifest"]:
        console.print(f"codebook: {result['manifest']['tokens']['note']}", markup=False, highlight=False)
        _say_tokens(result["manifest"], out)
    return not result["failed"]


@app.command()
def pretrain(
    config: Path = typer.Argument(None, help="TOML pretrain config; none = the embedded tiny run on ./pmd_out."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    run_dir: str = typer.Option(None, "--run-dir", help="The run folder, instead of the config's run_dir."),
) -> None:
    """FLAVA joint pretraining on built shards (multi-GPU: torchrun ... -m pmd_pipeline.train CONFIG)."""
    from pmd_pipeline.train.__main__ import run_pretrain

    with _errors_as_messages():
        say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
        run_pretrain(config, resume, say=say, run_dir=run_dir)


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="A run folder, a step_*.pt, or a Hugging Face FLAVA folder."),
    shards: str = typer.Option(None, help="Held-out shards for retrieval: a build folder or a shard list."),
    karpathy: str = typer.Option(None, help="Karpathy split file for retrieval (dataset_coco.json or zip::member)."),
    coco_images: list[str] = typer.Option(
        [], "--coco-images", help="COCO image zip by role, role=ZIP (e.g. val2014=val2014.zip); repeat per zip."
    ),
    split: str = typer.Option("test", help="The Karpathy split to evaluate on."),
    imagenet: str = typer.Option(None, help="ImageNet-style folder (or tar/zip) of class folders: classification."),
    classes: str = typer.Option(None, help="JSON {class folder: class name}; default: the folder names."),
    limit: int = typer.Option(5000, help="At most this many images per evaluation."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Zero-shot image-text retrieval (R@1/5/10 both ways) and classification with CLIP's prompt templates."""
    from pmd_pipeline.inspection.eval_view import show_eval
    from pmd_pipeline.train.evaluate import run_eval

    with _errors_as_messages():
        images = dict(_role_and_zip(entry) for entry in coco_images)
        result = run_eval(model, shards, karpathy, images, split, imagenet, classes, limit)
        print(json.dumps(result, indent=1)) if as_json else show_eval(result, Console())


def _role_and_zip(entry: str) -> tuple[str, str]:
    role, sep, path = entry.partition("=")
    if not sep or not role or not path:
        raise PmdError(f"--coco-images {entry!r}: expected ROLE=ZIP, e.g. val2014=/data/coco/val2014.zip")
    return role, path


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder (its last checkpoint) or a step_*.pt."),
    to: Path = typer.Option(..., "--to", help="The new Hugging Face folder to write."),
) -> None:
    """Write a run's model as a Hugging Face FLAVA folder (FlavaForPreTraining / FlavaModel load it), with its
    tokenizer, the codebook identity of its tokens and its resolved train config."""
    from pmd_pipeline.train.export import export as export_run

    with _errors_as_messages():
        checkpoint = export_run(run, to)
        console.print(f"exported {escape(str(checkpoint))} to [bold]{escape(str(to))}[/]", highlight=False)


# --- how a run stops: SIGINT (Ctrl-C) and SIGTERM (a scheduler, `kill`) take the same clean way out ---

STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
STOP_GRACE_S = 8.0  # a stop that has not ended the process by then ends it at once (what it leaves resumes)


class _Stopping:
    active = False  # inside a command that stops cleanly (its handlers are to be kept in place)
    what = "build"
    ray_started = False  # this command started or joined Ray (so it, and only it, shuts it down)
    signum: int | None = None  # the signal that asked this run to stop
    reported = threading.Lock()  # taken by whoever prints the one line (the main thread or the deadline)


_stopping = _Stopping()


def _install_stop_handlers() -> None:
    for signum in STOP_EXIT_CODES:
        signal.signal(signum, _on_stop_signal)


def _on_stop_signal(signum, frame) -> None:
    if _stopping.signum is not None:
        return  # a second Ctrl-C while stopping: the stop already under way (and its deadline) finishes it
    _stopping.signum = signum
    threading.Thread(target=_stop_deadline, name="pmd-stop-deadline", daemon=True).start()
    raise KeyboardInterrupt  # the main thread unwinds: Ray calls are interrupted, tasks cancelled on the way out


def _stop_deadline() -> None:
    """Whatever the main thread is doing (a library that swallowed the interrupt), the process ends in time."""
    time.sleep(STOP_GRACE_S)
    _report_stop()
    os._exit(STOP_EXIT_CODES[_stopping.signum])


def _report_stop() -> None:
    if not _stopping.reported.acquire(blocking=False):
        return
    name = signal.Signals(_stopping.signum or signal.SIGINT).name
    console.print(f"stopped by {name}; re-run the same command to resume the {_stopping.what}", highlight=False)


@contextlib.contextmanager
def _stops_cleanly(what: str):
    """SIGINT and SIGTERM become one KeyboardInterrupt: in-flight tasks are cancelled (by build/tokenize on the
    way out), Ray is shut down, one line is printed, and the exit code is 130 or 143. The folder resumes."""
    _stopping.active, _stopping.what = True, what
    previous = {signum: signal.getsignal(signum) for signum in STOP_EXIT_CODES}
    _install_stop_handlers()
    try:
        yield
    except KeyboardInterrupt:
        if _stopping.signum is None:  # an interrupt no handler of ours saw (raised by a library)
            _stopping.signum = signal.SIGINT
        _shutdown_ray()
        _report_stop()
        raise typer.Exit(STOP_EXIT_CODES[_stopping.signum]) from None
    finally:
        _stopping.active = False
        if _stopping.signum is None:  # a caller in this process (a test) gets its own back; a stopping run
            for signum, handler in previous.items():  # keeps ignoring a second Ctrl-C while it exits
                signal.signal(signum, handler)


def _shutdown_ray() -> None:
    """Disconnect (a joined cluster then drops this run's tasks) or stop the local instance, if this command
    started it (a caller's own Ray, in this process, is left alone)."""
    if not _stopping.ray_started:
        return
    try:
        import ray

        _stopping.ray_started = False
        ray.shutdown()
    except Exception:  # noqa: BLE001 - stopping anyway; the deadline thread ends the process if this hangs
        pass


@contextlib.contextmanager
def _disk_full_once(out: Path):
    """A full output device, wherever it is met (this process or a Ray task), is one line, said once."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err) or isinstance(err, typer.Exit):
            raise
        from pmd_pipeline.output import disk_full_error

        raise disk_full_error(out) from None


@contextlib.contextmanager
def _ray_down_on_failure():
    """Whatever ends a run early, Ray is shut down before OUT's lock is let go (no task of it writes on)."""
    try:
        yield
    except BaseException:
        _shutdown_ray()
        raise


@contextlib.contextmanager
def _errors_as_messages():
    """A PmdError (also one raised inside a Ray task) becomes one line on stderr and exit code 2."""
    try:
        yield
    except PmdError as err:
        cause = getattr(err, "cause", None)
        message = str(cause if isinstance(cause, PmdError) else err)
        console.print(f"[red]error:[/] {escape(message)}", highlight=False)  # messages quote [sections]
        raise typer.Exit(2) from None


if __name__ == "__main__":
    sys.exit(main())
