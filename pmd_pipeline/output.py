"""The output folder belongs to one config: claim it, or refuse with a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

from pmd_pipeline.config import BuildConfig
from pmd_pipeline.errors import PmdError
from shards.layout import atomic_write_json

CONFIG_FILE = "config.json"


def claim_output(cfg: BuildConfig) -> Path:
    """Create OUT and save the resolved config; an OUT made by a different config is never touched."""
    out = Path(cfg.out)
    saved = out / CONFIG_FILE
    if saved.exists():
        previous = _read_hash(saved)
        if previous != cfg.content_hash():
            raise PmdError(
                f"{out} was built with a different config (hash {previous}, this one {cfg.content_hash()}); "
                "use another --out, or delete that folder to rebuild it"
            )
    elif out.exists() and any(out.iterdir()):
        raise PmdError(f"{out} exists and is not a pmd build output; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, {"config_hash": cfg.content_hash(), "config": cfg.to_dict()})
    return out


def _read_hash(saved: Path) -> str | None:
    try:
        return json.loads(saved.read_text())["config_hash"]
    except (OSError, ValueError, KeyError):
        raise PmdError(f"{saved} is unreadable; delete the output folder or choose another --out") from None
