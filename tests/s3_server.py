"""A real S3 server for the tests: moto's threaded server on 127.0.0.1, configured the way users point s3fs
at MinIO or another S3-compatible store (AWS_ENDPOINT_URL and static keys in the environment)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SECRET = "pmd-test-secret-Zq81vX"  # distinctive, so a test can prove it is written nowhere


def s3_environment(endpoint: str) -> dict[str, str]:
    """What a user exports for an S3-compatible store; nothing here reaches beyond 127.0.0.1."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "pmd-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address for credentials
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = ("bucket",), own_process: bool = False) -> Iterator[dict[str, str]]:
    """Start moto's S3 server, set the environment for this process, create the buckets; yield the environment.

    own_process: run it as `python -m moto.server` (a benchmark must not share its GIL with the server)."""
    server = _ProcessServer() if own_process else _ThreadedServer()
    host, port = server.host_and_port
    env = s3_environment(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        _forget_cached_filesystems()
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_cached_filesystems()


class _ThreadedServer:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host_and_port = self.server.get_host_and_port()

    def stop(self) -> None:
        self.server.stop()


class _ProcessServer:
    def __init__(self):
        import socket
        import subprocess
        import sys
        import time

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.host_and_port = ("127.0.0.1", port)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(self.host_and_port, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()  # our own child, by its handle
        self.process.wait(timeout=30)


def _forget_cached_filesystems() -> None:
    """fsspec caches S3FileSystem instances (and their endpoint): a new server needs new ones."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def list_objects(url: str) -> dict[str, bytes]:
    """{key relative to url: bytes} of every object under an s3:// prefix (also while a build writes there)."""
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)  # other processes write here
    prefix = url.removeprefix("s3://").rstrip("/")
    objects = {}
    for path in fs.find(prefix):
        try:
            objects[path.removeprefix(prefix + "/")] = fs.cat_file(path)
        except FileNotFoundError:
            continue  # replaced or removed since the listing (a running build)
    return objects
