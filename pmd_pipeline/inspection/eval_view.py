"""`pmd eval`'s results as rich tables: recall both ways beside chance, and classification accuracy."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def show_eval(result: dict, console: Console) -> None:
    console.print(f"model: {escape(result['model'])} (text length {result['text_length']})", highlight=False)
    for name in ("retrieval_shards", "retrieval_karpathy"):
        if name in result:
            console.print(retrieval_table(result[name]))
    if "classification" in result:
        console.print(classification_table(result["classification"]))


def retrieval_table(r: dict) -> Table:
    table = Table(title=f"zero-shot retrieval: {escape(r['data'])}, {r['images']} images, {r['texts']} texts")
    table.add_column("direction")
    ks = list(r["image_to_text"])
    for k in ks:
        table.add_column(k, justify="right")
        table.add_column(f"chance {k}", justify="right", style="dim")
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        cells = [f"{v:.3f}" for k in ks for v in (r[direction][k], r["chance"][direction][k])]
        table.add_row(label, *cells)
    if r["skipped"]:
        table.caption = "left out: " + ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items()))
    return table


def classification_table(c: dict) -> Table:
    title = f"zero-shot classification: {escape(c['data'])}, {c['images']} images, {c['classes']} classes"
    table = Table(title=title)
    accuracies = [k for k in ("top1", "top5") if k in c]
    for name in (*accuracies, "chance top1", "templates"):
        table.add_column(name, justify="right")
    table.add_row(*(f"{c[k]:.3f}" for k in accuracies), f"{c['chance_top1']:.3f}", str(c["templates"]))
    if c["skipped"]:
        table.caption = "left out: " + ", ".join(f"{k} {v}" for k, v in sorted(c["skipped"].items()))
    return table
