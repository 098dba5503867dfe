"""`pmd tokenize OUT`: add or redo the dVAE tokens of a finished build without re-downloading anything."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from pmd_pipeline.build import start_ray
from pmd_pipeline.errors import PmdError
from pmd_pipeline.tokenize_stage import saved_config, tokenize_output


def tokenize_command(
    out: Path, codebook: str | None, force: bool, console: Console, precision: str | None = None
) -> bool:
    """Run the stage on a local Ray (or the build's cluster) and report; False when some shard failed."""
    if not out.is_dir():
        raise PmdError(f"{out} is not a folder; give a `pmd build` output")
    cfg = saved_config(out)  # read first: a wrong folder is refused before Ray starts
    start_ray(cfg)
    with Progress("[bold]tokenize", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("tokenize", total=None)
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        result = tokenize_output(out, codebook, force, progress, precision)
    for failure in result["failed"]:
        console.print(f"[red]failed:[/] {escape(failure)} (re-run the same command to retry)", highlight=False)
    console.print(f"[bold]{escape(str(out))}[/]: {result['shards']} shards, {result['tokenized']} tokenized now")
    if result["manifest"]:
        console.print(f"codebook: {result['manifest']['tokens']['note']}", markup=False, highlight=False)
    return not result["failed"]
