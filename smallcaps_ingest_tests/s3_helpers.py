"""A local S3-compatible server for the tests and benchmarks: moto's server mode on loopback.

``moto_s3()`` starts one server for the session (a free port on 127.0.0.1, no network beyond
loopback); every test creates its own bucket. ``s3_env`` is what a subprocess needs to reach it:
the standard AWS variables, which botocore (under s3fs) reads itself.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

# A recognisable fake secret, grepped for in leak tests (like conftest.TEST_KEY).
SECRET = "s3secret_4d1f0b7c2e9a"
ACCESS_KEY = "AKIATESTSMALLCAPS"


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """Start moto's S3 server on 127.0.0.1 (a free port); yields the AWS variables that reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
        }
    finally:
        server.stop()


def client(env: dict[str, str]):  # type: ignore[no-untyped-def]
    """A boto3 S3 client of the server ``env`` reaches."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    )


def new_bucket(env: dict[str, str]) -> str:
    """Create a bucket with a unique name on the server ``env`` reaches; returns its name."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    client(env).create_bucket(Bucket=name)
    return name


def list_keys(env: dict[str, str], bucket: str) -> dict[str, int]:
    """Every key in the bucket -> its size (the test's own view, not the package's)."""
    out: dict[str, int] = {}
    for page in client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out
