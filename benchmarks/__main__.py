"""`python -m benchmarks [NAME ...]`: run the named benchmarks (default: all) and print their JSON results."""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

BENCHES = {
    "fetch": "benchmarks.bench_fetch",
    "embedded": "benchmarks.bench_embedded",
    "yfcc": "benchmarks.bench_yfcc",
    "stats": "benchmarks.bench_stats",
    "train": "benchmarks.bench_train",
    "dvae": "benchmarks.bench_dvae",
    "storage": "benchmarks.bench_storage",
    "vg": "benchmarks.bench_vg",
    "streaming": "benchmarks.bench_streaming",
}
RESULTS = Path(__file__).parent / "results"


def main(names: list[str]) -> None:
    unknown = set(names) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    RESULTS.mkdir(exist_ok=True)
    for name in names or list(BENCHES):
        result = importlib.import_module(BENCHES[name]).run()
        result["machine"] = machine()
        print(json.dumps({name: result}, indent=1), flush=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def machine() -> dict:
    import os

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
