"""Where inputs and outputs live: local paths or any fsspec URL (s3://, gs://, ...)."""

from __future__ import annotations

import json
import os

import fsspec



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
    """The fsspec filesystem for a path or URL and the path inside it, taken literally.

    Not fsspec's url_to_fs: that reads '::' as URL chaining and may expand globs, so a file named
    'a::b.jpg' or a folder with '[' in its name would be another file, or none.
    """
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if is_remote(url) else "file"
    if protocol in ("s3", "s3a") and "AWS_ENDPOINT_URL" in os.environ:
        # botocore reads AWS_ENDPOINT_URL itself in recent versions; passing it explicitly keeps
        # S3-compatible stores (MinIO, moto) working with older ones too.
        options.setdefault("client_kwargs", {}).setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
    if protocol == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return fsspec.filesystem("file", **options), os.path.abspath(os.path.expanduser(path))
    fs = fsspec.filesystem(protocol, **options)
    return fs, url.split("://", 1)[1].rstrip("/") if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs")\
        else fs._strip_protocol(url)


def is_url(path: str) -> bool:
    """Whether a path is written as a URL (scheme://..., file:// included) rather than a local path."""
    return "://" in path


def is_remote(url: str) -> bool:
    """Whether a path is an object-store (or other non-local) URL."""
    head = url.split("/", 1)[0]
    return head.endswith(":") and url[len(head):].startswith("//") and not url.startswith("file://")


def protocol_prefix(url: str) -> str:
    """'s3://' for an s3:// URL, '' for a local path: what turns a filesystem path back into the URL."""
    return url.split("://", 1)[0] + "://" if is_remote(url) else ""


def join(root: str, name: str) -> str:
    """A name inside a folder or prefix (object-store paths always use '/')."""
    return root.rstrip("/") + "/" + name
