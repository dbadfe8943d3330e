"""What to annotate: the image paths under a folder or object-store prefix, or listed in a manifest."""

from __future__ import annotations

import os
import posixpath

import pyarrow.parquet as pq

from .storage import filesystem, is_remote

#: File name endings taken as images when listing a folder or prefix (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class InputError(ValueError):
    """INPUT cannot be listed: missing, unreachable or a malformed manifest."""


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_inputs(source: str, storage_options: dict | None = None) -> list[str]:
    """Image paths or URIs of a folder, a prefix, a .txt or .parquet manifest, or one image file."""
    try:
        fs, root = filesystem(source, storage_options)
        info = fs.info(root)
    except FileNotFoundError:
        raise InputError(f"INPUT {source} does not exist") from None
    except (OSError, ValueError) as error:
        raise InputError(f"INPUT {source} cannot be read: {_reason(error)}") from None
    protocol = source.split("://", 1)[0] + "://" if is_remote(source) else ""
    if info.get("type") == "directory":
        try:
            found = fs.find(root)
        except OSError as error:
            raise InputError(f"INPUT {source} cannot be listed: {_reason(error)}") from None
        paths = sorted(_full(protocol, path) for path in found if is_image_name(path))
    elif source.lower().endswith(".txt"):
        paths = _read_text_manifest(fs, root, protocol)
    elif source.lower().endswith(".parquet"):
        paths = _read_parquet_manifest(fs, root, source, protocol)
    else:
        # A single file given as INPUT is annotated whatever its name says.
        paths = [_full(protocol, root)]
    # A manifest naming an image twice still yields one row for it.
    return list(dict.fromkeys(paths))


def _full(protocol: str, path: str) -> str:
    """The URI of a path inside a filesystem; local paths become absolute."""
    if protocol:
        return protocol + path
    return os.path.abspath(path)


def _resolve(entry: str, base: str, protocol: str) -> str:
    """A manifest entry made absolute: URIs as written, relative paths against the manifest's folder."""
    if "://" in entry:
        return entry
    if protocol:
        return protocol + posixpath.normpath(posixpath.join(base, entry))
    return os.path.abspath(os.path.join(base, os.path.expanduser(entry)))


def _read_text_manifest(fs, root: str, protocol: str) -> list[str]:
    try:
        with fs.open(root, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"manifest {root} is not UTF-8 text with one path per line") from None
    base = posixpath.dirname(root) if protocol else os.path.dirname(root)
    entries = (line.strip() for line in lines)
    return [_resolve(entry, base, protocol) for entry in entries if entry and not entry.startswith("#")]


def _read_parquet_manifest(fs, root: str, source: str, protocol: str) -> list[str]:
    try:
        with fs.open(root, "rb") as handle:
            manifest = pq.ParquetFile(handle)
            if "path" not in manifest.schema_arrow.names:
                raise InputError(f"manifest {source} has no 'path' column (it has "
                                 f"{', '.join(manifest.schema_arrow.names)})")
            table = manifest.read(columns=["path"])
    except InputError:
        raise
    except Exception as error:  # pyarrow raises several types for a malformed file
        raise InputError(f"manifest {source} is not a readable Parquet file: {_reason(error)}") from None
    base = posixpath.dirname(root) if protocol else os.path.dirname(root)
    return [_resolve(path, base, protocol) for path in table.column("path").to_pylist() if path]


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type when there is none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
