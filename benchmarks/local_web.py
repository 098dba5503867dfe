"""A stand-in for the web: N synthetic JPEGs served by a separate process on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from pmd_pipeline.embedded import synth_body


def make_images(root: Path, n: int) -> list[str]:
    """Write n JPEGs (240-640 px, like small web images) under root/img/; return their paths."""
    names = [f"img/{i:05d}.jpg" for i in range(n)]
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (root / name).exists():
            (root / name).write_bytes(synth_body("jpg", name))
    return names


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """A threading static server in its own process, so it does not share a GIL with what it measures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The same server the embedded default uses, in a process of its own.
    code = (
        "import sys, time; from pmd_pipeline.fetch.mirror import StaticServer as S; "
        "S(sys.argv[1], int(sys.argv[2])).__enter__(); time.sleep(1e9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(port)])
    _wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"


def _wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} did not start")
