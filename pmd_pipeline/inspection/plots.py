"""`pmd stats --plots DIR`: PNG charts of a build (caption lengths, failure reasons, image sizes, codebook usage).

Each chart is built as a matplotlib Figure (the tests read its artists) and then saved; every source keeps
one colour of its own in every chart.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on build machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from shards.layout import CODEBOOK_SIZE  # noqa: E402
from shards.stats import written_rows  # noqa: E402

TOP_REASONS = 20
TOP_CODES_SHOWN = 20
MAX_BINS = 60  # caption-length bins per panel: 1 word wide up to 60 words, wider for long text passages
# tab20 in the order dark 0..9 then light 0..9: the first ten sources get ten different hues
TAB20_ORDER = [*range(0, 20, 2), *range(1, 20, 2)]


def write_plots(out: Path, report: dict, folder: Path, sample_shards: int) -> list[Path]:
    """Write the charts; returns the files written (codebook usage only when some image is tokenized)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {name: written_rows(out, name, sample_shards)[0] for name in report["sources"]}
    colours = source_colours(list(report["sources"]))
    figures = {
        "caption_words.png": caption_length_figure(rows, report, colours),
        "failure_reasons.png": reasons_figure(report),
        "image_sizes.png": image_size_figure(rows, colours),
    }
    if report["total"]["tokens"]["samples_tokenized"]:  # text-only shards have sidecars but no codes
        figures["codebook_usage.png"] = codebook_figure(report)
    return [_save(fig, folder / name) for name, fig in figures.items()]


def source_colours(names: list[str]) -> dict[str, tuple]:
    """One distinct colour per source (matplotlib's 10-colour cycle repeats from the 11th source on)."""
    if len(names) <= len(TAB20_ORDER):
        palette = plt.get_cmap("tab20").colors
        return {name: palette[TAB20_ORDER[i]] for i, name in enumerate(names)}
    turbo = plt.get_cmap("turbo")
    return {name: turbo(i / (len(names) - 1)) for i, name in enumerate(names)}


def caption_bins(words: np.ndarray) -> np.ndarray:
    """Bin edges centred on whole words, from 0 past the longest caption, in at most MAX_BINS bins."""
    longest = int(words.max()) if len(words) else 0
    width = max(1, math.ceil((longest + 1) / MAX_BINS))
    return np.arange(0, longest + width + 1, width) - 0.5


def _grid(n: int) -> tuple[Figure, list]:
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def caption_length_figure(rows: dict, report: dict, colours: dict) -> Figure:
    """Words per caption per source, with this build's mean and the paper's mean marked."""
    fig, axes = _grid(len(rows))
    for ax, (name, frame) in zip(axes, rows.items(), strict=False):
        words = frame["words"].list.explode().drop_nulls().to_numpy()
        summary = report["sources"][name]
        ax.set_title(f"{name} ({summary['pairs_written']:,} pairs)", fontsize=10)
        if not len(words):  # image-only (imagenet) or nothing written: say so instead of an empty frame
            ax.text(0.5, 0.5, _no_captions(summary), ha="center", va="center", transform=ax.transAxes, color="#555555")
            ax.set(xticks=[], yticks=[])
            continue
        bins = caption_bins(words)
        ax.hist(words, bins=bins, color=colours[name])
        means = [("build", summary["mean_caption_words"], "-")]
        means += [("paper", summary["paper"]["mean_words"], "--")] if summary["paper"] else []
        for label, mean, style in means:
            ax.axvline(mean, color="black", linestyle=style, label=f"{label} mean {mean:g}")
        ax.set_xlim(bins[0], max(bins[-1], *(m * 1.05 for _, m, _ in means)))  # both means inside the frame
        ax.set(xlabel="words per caption", ylabel="captions")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _no_captions(summary: dict) -> str:
    if summary["samples_written"]:
        return f"no captions\n({summary['samples_written']:,} images without text)"
    return "no captions\n(no samples written)"


def reasons_figure(report: dict) -> Figure:
    """Why rows did not become samples: fetch failures and filter drops, per reason, over all sources."""
    total = report["total"]
    counts = [(f"failed: {r}", n) for r, n in total["rows_failed"].items()]
    counts += [(f"dropped: {r}", n) for r, n in total["rows_dropped"].items()]
    counts += [(f"malformed: {r}", n) for r, n in total["rejected_by_reason"].items()]
    counts = sorted(counts, key=lambda c: c[1])[-TOP_REASONS:]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(counts) + 1.5))
    if counts:
        labels, values = zip(*counts, strict=True)
        palette = {"failed": "#c44e52", "dropped": "#8172b2", "malformed": "#8c8c8c"}
        colors = [palette[lab.split(":")[0]] for lab in labels]
        ax.barh(labels, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
        ax.margins(x=0.12)  # room for the count after the longest bar
    else:
        ax.text(0.5, 0.5, "no failures or drops", ha="center", transform=ax.transAxes)
    ax.set_xlabel("rows")
    ax.set_title(f"rows not written, by reason ({total['rows_in']:,} rows in, {total['samples_written']:,} written)")
    fig.tight_layout()
    return fig


def image_size_figure(rows: dict, colours: dict) -> Figure:
    """Original image sizes (before the crop) and stored JPEG sizes per source; one legend for both panels."""
    fig, (sizes, stored) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")  # room for the legend
    frames = {n: f.drop_nulls(["original_width", "original_height"]) for n, f in rows.items()}
    frames = {n: f for n, f in frames.items() if f.height}
    stored_kib = np.concatenate([f["image_bytes"].to_numpy() / 1024 for f in frames.values()] or [np.zeros(1)])
    bins = np.linspace(0, stored_kib.max() or 1, 30)
    for name, frame in frames.items():
        colour = colours[name]
        sizes.scatter(frame["original_width"], frame["original_height"], s=8, alpha=0.6, color=colour, label=name)
        stored.hist(frame["image_bytes"].to_numpy() / 1024, bins=bins, histtype="step", linewidth=1.5, color=colour)
    sizes.set(xlabel="original width (px)", ylabel="original height (px)", title="original image sizes")
    stored.set(xlabel="stored JPEG (KiB)", ylabel="images", title="stored image bytes")
    if frames:
        fig.legend(loc="outside right center", fontsize=8, markerscale=2, frameon=False)
    else:
        sizes.text(0.5, 0.5, "no images", ha="center", transform=sizes.transAxes)
    return fig


def codebook_figure(report: dict) -> Figure:
    """How many of the 8192 dVAE codes occur and how skewed their use is (log-log: the used codes fill the axis
    however few there are), and the most frequent ones."""
    tokens = report["total"]["tokens"]
    counts = tokens["code_counts"]
    used = tokens["codes_used"]
    fig, (rank, top) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranked = np.sort(counts)[::-1][:used]
    rank.plot(np.arange(1, used + 1), ranked, color="#4c72b0", marker="." if used < 50 else None)
    rank.set(xscale="log", yscale="log", xlabel="code rank (log)", ylabel="occurrences (log)", xlim=(1, CODEBOOK_SIZE))
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # 260, not 2.6x10^2: a narrow range labels its minor ticks
    rank.xaxis.set_major_formatter(plain)
    rank.yaxis.set_major_formatter(plain)
    rank.yaxis.set_minor_formatter(plain)
    if used < CODEBOOK_SIZE:  # the codes never used have no point on a log axis: shade their ranks instead
        rank.axvspan(max(used, 1), CODEBOOK_SIZE, color="#dddddd", label=f"{CODEBOOK_SIZE - used:,} codes never used")
        rank.legend(fontsize=8, loc="upper right")
    rank.set_title(f"{used:,} of {CODEBOOK_SIZE} codes used ({tokens['samples_tokenized']:,} images)")
    order = np.argsort(counts, kind="stable")[::-1][:TOP_CODES_SHOWN]
    order = order[counts[order] > 0]
    top.bar([str(c) for c in order], counts[order], color="#55a868")
    top.set(xlabel="code", ylabel="occurrences", title=f"the {len(order)} most frequent codes")
    top.tick_params(axis="x", rotation=90, labelsize=7)
    if tokens["codebook_random"]:
        fig.suptitle("random codebook: tokens are placeholders, not DALL-E's", color="#c44e52")
    fig.tight_layout()
    return fig
