"""Test helpers: build the embedded default in-process, read shards back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from pmd_pipeline.build import build
from pmd_pipeline.config import TokenizeConfig
from pmd_pipeline.embedded import default_config, materialize
from pmd_pipeline.fetch.mirror import StaticServer, use_mirror
from pmd_pipeline.output import claim_output


def build_embedded(out: Path, tokenize: bool | TokenizeConfig = False, **overrides):
    """The embedded default through build(); without dVAE tokens unless asked (the real encoder is about 1 s
    per image on a 2-core CPU: tests that need tokens pass a TokenizeConfig with a small codebook)."""
    cfg = default_config(str(out))
    cfg.tokenize = tokenize if isinstance(tokenize, TokenizeConfig) else TokenizeConfig(enabled=tokenize)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    claim_output(cfg)
    root = materialize(cfg.out)
    with StaticServer(root / "mirror") as server:
        use_mirror(cfg.fetch, server.url)
        return build(cfg)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_samples(out: Path) -> dict[str, bytes]:
    """Every member of every shard of a build, by member name."""
    members: dict[str, bytes] = {}
    for tar in sorted(out.glob("*/[0-9]*.tar")):
        for name, data in tar_members(tar).items():
            assert name not in members, f"duplicate member {name}"
            members[name] = data
    return members


def sample_captions(out: Path) -> dict[str, list[str]]:
    return {
        name[: -len(".json")]: json.loads(data)["captions"]
        for name, data in all_samples(out).items()
        if name.endswith(".json")
    }


def jpeg_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size
