"""`pmd stats --plots DIR`: PNG charts of a build (caption lengths, failure reasons, image sizes, codebook usage)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on build machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shards.layout import CODEBOOK_SIZE  # noqa: E402
from shards.stats import written_rows  # noqa: E402

TOP_REASONS = 20
TOP_CODES_SHOWN = 20


def write_plots(out: Path, report: dict, folder: Path, sample_shards: int) -> list[Path]:
    """Write the charts; returns the files written (codebook usage only when some shard is tokenized)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {name: written_rows(out, name, sample_shards)[0] for name in report["sources"]}
    charts = [
        caption_length_chart(rows, report, folder / "caption_words.png"),
        reasons_chart(report, folder / "failure_reasons.png"),
        image_size_chart(rows, folder / "image_sizes.png"),
    ]
    if report["total"]["tokens"]["shards_tokenized"]:
        charts.append(codebook_chart(report, folder / "codebook_usage.png"))
    return charts


def _grid(n: int):
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def caption_length_chart(rows: dict, report: dict, path: Path) -> Path:
    """Words per caption per source, with this build's mean and the paper's mean marked."""
    fig, axes = _grid(len(rows))
    for ax, (name, frame) in zip(axes, rows.items(), strict=False):
        words = frame["words"].list.explode().drop_nulls().to_numpy()
        summary = report["sources"][name]
        ax.set_title(f"{name} ({summary['pairs_written']:,} pairs)")
        ax.set_xlabel("words per caption")
        if len(words):
            ax.hist(words, bins=np.arange(0, min(int(words.max()), 80) + 2) - 0.5, color="#4c72b0")
        if summary["mean_caption_words"] is not None:
            ax.axvline(
                summary["mean_caption_words"], color="black", label=f"build mean {summary['mean_caption_words']:g}"
            )
        if summary["paper"]:
            mean = summary["paper"]["mean_words"]
            ax.axvline(mean, color="#c44e52", linestyle="--", label=f"paper mean {mean:g}")
        if ax.get_legend_handles_labels()[0]:  # an image-only source has neither mean to mark
            ax.legend(fontsize=8)
    return _save(fig, path)


def reasons_chart(report: dict, path: Path) -> Path:
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
    else:
        ax.text(0.5, 0.5, "no failures or drops", ha="center", transform=ax.transAxes)
    ax.set_xlabel("rows")
    ax.set_title(f"rows not written, by reason ({total['rows_in']:,} rows in, {total['samples_written']:,} written)")
    return _save(fig, path)


def image_size_chart(rows: dict, path: Path) -> Path:
    """Original image sizes (before the crop) and stored JPEG sizes per source."""
    fig, (sizes, stored) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, frame in rows.items():
        frame = frame.drop_nulls(["original_width", "original_height"])
        if frame.height:
            sizes.scatter(frame["original_width"], frame["original_height"], s=4, alpha=0.4, label=name)
            stored.hist(frame["image_bytes"].to_numpy() / 1024, bins=40, alpha=0.5, label=name)
    sizes.set(xlabel="original width (px)", ylabel="original height (px)", title="original image sizes")
    stored.set(xlabel="stored JPEG (KiB)", ylabel="images", title="stored image bytes")
    for ax in (sizes, stored):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, markerscale=3)
    return _save(fig, path)


def codebook_chart(report: dict, path: Path) -> Path:
    """How many of the 8192 dVAE codes occur, how skewed their use is, and the most frequent ones."""
    tokens = report["total"]["tokens"]
    counts = tokens["code_counts"]
    fig, (rank, top) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranked = np.sort(counts)[::-1]
    rank.plot(np.arange(1, CODEBOOK_SIZE + 1), np.maximum(ranked, 0.8), color="#4c72b0")
    rank.set(yscale="log", xlabel="code rank", ylabel="occurrences", xlim=(1, CODEBOOK_SIZE))
    rank.set_title(f"{tokens['codes_used']:,} of {CODEBOOK_SIZE} codes used ({tokens['samples_tokenized']:,} images)")
    order = np.argsort(counts, kind="stable")[::-1][:TOP_CODES_SHOWN]
    top.bar([str(c) for c in order], counts[order], color="#55a868")
    top.set(xlabel="code", ylabel="occurrences", title=f"the {TOP_CODES_SHOWN} most frequent codes")
    top.tick_params(axis="x", rotation=90, labelsize=7)
    if tokens["codebook_random"]:
        fig.suptitle("random codebook: tokens are placeholders, not DALL-E's", color="#c44e52")
    return _save(fig, path)
