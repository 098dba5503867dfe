"""Shared fixtures: one local Ray instance per test session (no dashboard), and one embedded build."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# albumentations asks pypi.org for a newer version when imported; a test module may import it before
# pmd_pipeline (whose __init__ sets this too). No test reaches any address but 127.0.0.1.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REALDATA = Path(os.environ.get("PMD_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pmd_pipeline.cli import keep_token_auth

    keep_token_auth()  # as `pmd build` does: token auth on, without Ray's warning
    # "local": our own instance, never a cluster someone left running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_build(ray_session, tmp_path_factory):
    """The embedded default, built once through the same code path as `pmd build`."""
    from tests.helpers import build_embedded

    out = tmp_path_factory.mktemp("embedded") / "pmd_out"
    result = build_embedded(out)
    return out, result


def realdata(*parts: str) -> Path:
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample data not available: {path}")
    return path
