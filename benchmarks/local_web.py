"""A stand-in for the web: N synthetic JPEGs served by a separate process on 127.0.0.1.

`serve(root, latency_s=0.1)` answers every request only after that delay (a threaded server, so requests
wait side by side, as on a real crawl where the time goes to round trips and remote servers, not to us).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pmd_pipeline.embedded import synth_body

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int) -> list[str]:
    """Write n JPEGs (240-640 px, like small web images) under root/img/; return their paths."""
    names = [f"img/{i:05d}.jpg" for i in range(n)]
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (root / name).exists():
            (root / name).write_bytes(synth_body("jpg", name))
    return names


def serve(root: Path, latency_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    """A threading static server in its own process, so it does not share a GIL with what it measures.

    latency_s > 0: every GET is answered after sleeping that long (per request, in its own thread).
    Stop it with `proc.terminate()` (or `stop(proc)`, which also waits for it).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.local_web", str(root), str(port), repr(float(latency_s))]
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_for_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a server started by `serve` (this process only), and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _SlowHandler(SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.server.latency_s:
            time.sleep(self.server.latency_s)  # time to first byte: the round trips and the remote server
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many crawler threads connect at once; the default backlog is 5

    def __init__(self, port: int, root: str, latency_s: float):
        self.latency_s = latency_s
        super().__init__(("127.0.0.1", port), lambda *a: _SlowHandler(*a, directory=root))


def _main(root: str, port: str, latency_s: str = "0") -> None:
    if float(latency_s) == 0:  # the same server the embedded default uses, in a process of its own
        from pmd_pipeline.fetch.mirror import StaticServer

        StaticServer(Path(root), int(port)).__enter__()
        time.sleep(1e9)
    _Server(int(port), root, float(latency_s)).serve_forever()


def _wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the local web server exited with code {proc.returncode} before it listened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} did not start")


if __name__ == "__main__":
    _main(*sys.argv[1:])
