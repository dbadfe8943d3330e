"""Where inputs and outputs live: local paths or any fsspec URL (s3://, gs://, ...)."""

from __future__ import annotations

import json
import os

import fsspec
from fsspec.core import url_to_fs

from .redaction import redact  # noqa: F401 - kept here for callers that import it from storage


def parse_storage_options(text: str | None) -> dict:
    """Storage options from a JSON object on the command line (or {} when not given)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--storage-options must be a JSON object: {error.msg}") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. "
                         '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    return options


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path or URL and the path inside it."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a") and "AWS_ENDPOINT_URL" in os.environ:
        # botocore reads AWS_ENDPOINT_URL itself in recent versions; passing it explicitly keeps
        # S3-compatible stores (MinIO, moto) working with older ones too.
        options.setdefault("client_kwargs", {}).setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
    return url_to_fs(url, **options)


def is_remote(url: str) -> bool:
    """Whether a path is an object-store (or other non-local) URL."""
    return "://" in url and not url.startswith("file://")
