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
def s3_server(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[dict[str, str]]:
    """Start moto's S3 server, set the environment for this process, create the buckets; yield the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
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
