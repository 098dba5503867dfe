"""`python -m pmd_pipeline.train [CONFIG] [--resume]`: the entry point torchrun starts on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import load_train_config
from pmd_pipeline.train.trainer import train


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    paths = [a for a in argv if a != "--resume"]
    try:
        train(load_train_config(Path(paths[0]) if paths else None), resume=resume)
    except PmdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
