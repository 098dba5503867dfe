"""`pmd plan`'s table: one line per source, then the totals and the hours on the cluster asked about."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pmd_pipeline.inspection.stats_view import human_bytes


def show_plan(report: dict, console: Console) -> None:
    console.print(_sources_table(report))
    totals, cluster = report["totals"], report["cluster"]
    console.print(
        f"inputs {human_bytes(totals['input_bytes'])} in {totals['files']} files, "
        f"{human_bytes(totals['download_bytes'])} of them to download"
        + (f" ({len(totals['unknown_sizes'])} of unknown size)" if totals["unknown_sizes"] else "")
        + f"; output ~{human_bytes(totals['output_bytes'])}; disk at peak ~{human_bytes(totals['peak_disk_bytes'])}",
        highlight=False,
    )
    hours = totals["hours"]
    gpus = f", {cluster['gpus_per_node']} GPUs" if cluster["gpus_per_node"] else ", no GPU"
    console.print(
        f"on {cluster['nodes']} node(s) of {cluster['cpus_per_node']} CPUs{gpus}: ~{_time(hours['build'])} "
        f"(download {_time(hours['download'])} at {cluster['download_mb_s']:g} MB/s a node, metadata "
        f"{_time(hours['metadata'])}, then fetch {_time(hours['fetch'])} and tokens {_time(hours['tokens'])}, "
        "overlapping)",
        highlight=False,
    )
    console.print(
        "[dim]pairs and samples are before image failures (link rot); 'paper' = FLAVA Table 2's count, used "
        "where the metadata is not local (--count downloads it to count); rates: BENCHMARKS.md[/]"
    )


def _time(hours: float) -> str:
    if hours < 1 / 60:
        return "< 1 min"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


SHORT = {"local archives": "local", "URLs": "URLs", "none": "-"}


def _sources_table(report: dict) -> Table:
    table = Table(title="pmd plan", title_justify="left")
    for column in ("source", "files", "bytes", "rows", "pairs", "samples", "shards", "output", "images", "basis"):
        table.add_column(column, justify="left" if column in ("source", "images", "basis") else "right")
    for s in report["sources"]:
        known = [f["bytes"] for f in s["files"] if f["bytes"] is not None]
        missing = len(s["files"]) - len(known)
        table.add_row(
            s["source"],
            str(len(s["files"])),
            human_bytes(sum(known)) + (f" +{missing}?" if missing else ""),
            "-" if s["rows"] is None else f"{s['rows']:,}",
            f"{s['expected_pairs']:,}",
            f"{s['expected_samples']:,}",
            f"{s['shards']:,}",
            human_bytes(s["output_bytes"]),
            SHORT.get(s["images_from"], s["images_from"]),
            s["estimate"],
        )
    return table
