"""Benchmarks for the issues' figures; run them with `just bench` (see BENCHMARKS.md)."""

import os as _os

_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks pypi.org on import otherwise
