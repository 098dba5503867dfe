"""`python -m pmd_pipeline.train [CONFIG] [--resume] [--run-dir DIR]`: the entry point torchrun starts on every rank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import load_train_config
from pmd_pipeline.train.trainer import train


def run_pretrain(config: Path | None, resume: bool, say=print, run_dir: str | None = None) -> Path:
    """What `pmd pretrain` runs: the embedded tiny default when no config is given; run_dir overrides the config's."""
    cfg = load_train_config(config, **({"run_dir": str(run_dir)} if run_dir else {}))
    if config is None:
        say(f"pretrain: embedded tiny default on ./{cfg.data.shards}, run folder {cfg.run_dir}")
    return train(cfg, resume=resume, say=say)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmd_pipeline.train")
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)
    try:
        run_pretrain(args.config, args.resume, run_dir=args.run_dir)
    except PmdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
