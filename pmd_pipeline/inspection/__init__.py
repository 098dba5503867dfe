"""Views of a finished build: `pmd stats` (tables, JSON, plots), `pmd show` and `pmd verify` (re-reads every tar)."""

from __future__ import annotations

import os

from rich.console import Console, RenderableType
from rich.measure import Measurement


def console_for(*tables: RenderableType) -> Console:
    """A console wide enough for `tables`.

    On a terminal, or with COLUMNS set, rich's own width. Redirected to a file or a pipe rich assumes 80
    columns and cuts every source name to a few letters, so there the console is as wide as the widest
    table wants to be.
    """
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    unbounded = Console(width=10_000)
    wanted = max(Measurement.get(unbounded, unbounded.options, table).maximum for table in tables)
    return Console(width=max(80, wanted))
