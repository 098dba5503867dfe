"""`python -m pmd_pipeline.train [CONFIG] [--resume]`: the entry point torchrun starts on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import load_train_config
from pmd_pipeline.train.trainer import train


def run_pretrain(config: Path | None, resume: bool, say=print) -> Path:
    """What `pmd pretrain` runs: the embedded tiny default when no config is given."""
    cfg = load_train_config(config)
    if config is None:
        say(f"pretrain: embedded tiny default on ./{cfg.data.shards}, run folder {cfg.run_dir}")
    return train(cfg, resume=resume, say=say)


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    paths = [a for a in argv if a != "--resume"]
    try:
        run_pretrain(Path(paths[0]) if paths else None, resume)
    except PmdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
