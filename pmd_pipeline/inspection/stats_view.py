"""`pmd stats`: the build statistics as rich tables or JSON, beside the paper's figures for each source."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pmd_pipeline.errors import PmdError
from pmd_pipeline.inspection import console_for
from shards.stats import DEFAULT_SAMPLE_SHARDS, collect_stats

# Every table fits a 120-column terminal with the longest source name whole; --wide adds two more tables.
WIDE_HINT = "--wide adds where the rows went (malformed, failed, dropped, top reasons) and the dVAE codebooks"


def run_stats(
    out: Path,
    source: str | None,
    as_json: bool,
    plots: Path | None,
    sample_shards: int = DEFAULT_SAMPLE_SHARDS,
    codes: bool = False,
    wide: bool = False,
) -> dict:
    if sample_shards < 0:
        raise PmdError("--sample-shards must be 0 (read every shard) or a positive number")
    report = collect_stats(out, source, sample_shards=sample_shards, codes=codes or plots is not None)
    report = with_paper_figures(report)
    if as_json:
        print(json.dumps(public_report(report), indent=1))
    else:
        print_tables(report, wide)
    if plots is not None:
        from pmd_pipeline.inspection.plots import write_plots

        written = write_plots(out, report, plots, sample_shards)
        Console(stderr=True).print(f"{len(written)} charts written to {plots}", highlight=False)
    return report


def print_tables(report: dict, wide: bool) -> None:
    tables = [counts_table(report), content_table(report)]
    if wide:
        tables += [rows_table(report), tokens_table(report)]
    console = console_for(*tables)
    for table in tables:
        console.print(table)
    for note in _shared_figure_notes(report):
        console.print(note, style="dim", highlight=False)
    console.print(_sampling_note(report), style="dim", highlight=False)
    if not wide:
        console.print(WIDE_HINT, style="dim", highlight=False)
    if report["manifest_tokens"]:
        tokens = report["manifest_tokens"]
        codebook = f"{escape(str(tokens['codebook']))}: " if tokens.get("codebook") else ""
        random = "[red](random codebook)[/] " if tokens.get("random") else ""
        console.print(f"tokens: {codebook}{random}{escape(tokens.get('note', ''))}", highlight=False)


def with_paper_figures(report: dict) -> dict:
    """The build's counts beside FLAVA Table 2's pairs and mean words, per source and in total.

    The total counts each figure of the table once: Localized Narratives' subsets each show the 1.9M the
    paper gives for all four together (`group` names it), and the total adds it once (70M for all of PMD)."""
    from sources import paper_total

    for name, summary in report["sources"].items():
        summary["paper"] = paper_figures(name)
    report["total"]["paper"] = paper_total(report["sources"])
    return report


def paper_figures(name: str) -> dict | None:
    """FLAVA Table 2's pairs and mean words for a registered PMD source (None for unimodal or unknown ones);
    `group`: the sources the figure is for together (LN's subsets), else None."""
    from sources import REGISTRY

    source = REGISTRY.get(name)
    if source is None or not source.info.paper_pairs:
        return None
    info = source.info
    return {"pairs_millions": info.paper_pairs, "mean_words": info.paper_avg_words, "group": info.paper_group or None}


def public_report(report: dict) -> dict:
    """The report without the 8192 code counts per source (the plots use them; JSON readers get a summary)."""

    def strip(summary: dict) -> dict:
        tokens = {k: v for k, v in summary["tokens"].items() if k != "code_counts"}
        return {**summary, "tokens": tokens}

    return {
        **report,
        "sources": {name: strip(s) for name, s in report["sources"].items()},
        "total": strip(report["total"]),
    }


def _rows(report: dict) -> list[tuple[str, dict]]:
    return list(report["sources"].items()) + [("total", report["total"])]


def counts_table(report: dict) -> Table:
    table = _table(f"PMD build {report['out']}: counts", report)
    for column in ("shards", "samples", "pairs", "paper pairs", "fetch ok", "on disk"):
        table.add_column(column, justify="right")
    for name, s in _rows(report):
        table.add_row(
            name,
            f"{s['shards']}/{s['shards_planned']}",
            f"{s['samples_written']:,}",
            f"{s['pairs_written']:,}",
            _paper_pairs(s["paper"]),
            f"{s['fetch_success_rate']:.1%}" if s["fetch_success_rate"] is not None else "-",
            human_bytes(s["tar_bytes"]),
            end_section=name == list(report["sources"])[-1],
        )
    return table


def content_table(report: dict) -> Table:
    table = _table("captions, images and dVAE tokens", report)
    for column in ("words/pair", "paper", "median (p10-p90)", "image p50 (px)", "KiB p50", "tokenized"):
        table.add_column(column, justify="right")
    for name, s in _rows(report):
        dist, tokens, paper = s["distribution"] or {}, s["tokens"], s["paper"]
        table.add_row(
            name,
            f"{s['mean_caption_words']:.2f}" if s["mean_caption_words"] is not None else "-",
            f"{paper['mean_words']:g}" if paper else "-",
            _spread(dist.get("caption_words")),
            _size(dist),
            f"{dist['image_bytes']['p50'] / 1024:.1f}" if dist.get("image_bytes") else "-",
            _tokenized(tokens),
            end_section=name == list(report["sources"])[-1],
        )
    return table


def rows_table(report: dict) -> Table:
    """--wide: where each source's raw rows went, the top reasons one per line (so the table stays narrow)."""
    table = _table("rows: malformed, failed, dropped", report)
    for column in ("rows in", "malformed", "failed", "dropped"):
        table.add_column(column, justify="right")
    table.add_column("top reasons")
    for name, s in _rows(report):
        reasons = [f"failed  {line}" for line in _top(s["rows_failed"])]
        reasons += [f"dropped {line}" for line in _top(s["rows_dropped"])]
        table.add_row(
            name,
            f"{s['rows_in']:,}",
            f"{s['rejected_raw_records']:,}",
            f"{sum(s['rows_failed'].values()):,}",
            f"{sum(s['rows_dropped'].values()):,}",
            "\n".join(reasons) or "-",
            end_section=name == list(report["sources"])[-1],
        )
    return table


def tokens_table(report: dict) -> Table:
    """--wide: the dVAE tokens per source, counted in samples with an image (text-only sources have none)."""
    table = _table("dVAE tokens", report)
    for column in ("images", "tokenized", "failed", "shards"):
        table.add_column(column, justify="right")
    table.add_column("codebook")
    table.add_column("codes used", justify="right")
    for name, s in _rows(report):
        tokens = s["tokens"]
        table.add_row(
            name,
            f"{tokens['samples_with_image']:,}",
            f"{tokens['samples_tokenized']:,}",
            f"{tokens['samples_failed']:,}",
            f"{tokens['shards_tokenized']}/{s['shards']}",
            _codebook(tokens),
            f"{tokens['codes_used']}/8192" if tokens["codes_used"] is not None and tokens["shards_tokenized"] else "-",
            end_section=name == list(report["sources"])[-1],
        )
    return table


def _table(title: str, report: dict) -> Table:
    """A table whose first column holds the source names whole: the other columns give way first."""
    table = Table(title=title, title_justify="left")
    longest = max(len(name) for name, _ in _rows(report))
    table.add_column("source", no_wrap=True, min_width=longest)
    return table


def _tokenized(tokens: dict) -> str:
    """The share of the samples with an image that carry tokens; text-only sources have none to tokenize."""
    if tokens["tokenized_fraction"] is None:
        return "no images"
    return f"{tokens['tokenized_fraction']:.0%}"


def _paper_pairs(paper: dict | None) -> str:
    if not paper:
        return "-"
    return f"{paper['pairs_millions']:g}M" + ("*" if paper.get("group") else "")


def _shared_figure_notes(report: dict) -> list[str]:
    """One line per figure the paper gives for several sources together, as the `*` in the table."""
    from sources import paper_group_members

    groups = sorted({s["paper"]["group"] for s in report["sources"].values() if s["paper"] and s["paper"]["group"]})
    return [
        f"* paper pairs of {group}: one figure for its {len(paper_group_members(group))} subsets together, "
        "counted once in the total"
        for group in groups
    ]


def _sampling_note(report: dict) -> str:
    read = [(s["distribution"]["shards_read"], s["shards"]) for s in report["sources"].values() if s["distribution"]]
    partial = sum(r for r, n in read if r < n), sum(n for r, n in read if r < n)
    if not partial[1]:
        return "counts are exact sums of every finished shard; distributions read every shard's parquet"
    return (
        f"counts are exact sums of every finished shard; medians and percentiles come from {partial[0]} of "
        f"{partial[1]} shards' parquet files, evenly spaced (--sample-shards 0 reads all)"
    )


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _top(counts: dict, n: int = 3) -> list[str]:
    return [f"{k} {v:,}" for k, v in list(counts.items())[:n]]


def _spread(p: dict | None) -> str:
    return f"{p['p50']:g} ({p['p10']:g}-{p['p90']:g})" if p else "-"


def _size(dist: dict) -> str:
    w, h = dist.get("original_width"), dist.get("original_height")
    return f"{w['p50']:.0f}x{h['p50']:.0f}" if w and h else "-"


def _codebook(tokens: dict) -> str:
    if not tokens["codebooks"]:
        return "-"
    names = [c[:19] + "…" if c.startswith("sha256:") else c for c in tokens["codebooks"]]
    return ("[red]RANDOM[/] " if tokens["codebook_random"] else "") + ", ".join(names)
