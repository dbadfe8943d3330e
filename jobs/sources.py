"""What to annotate, streamed: image paths under a folder or prefix, or in a manifest, in chunks.

Nothing here holds a whole listing. A source is cut into `ListingShard`s (a whole folder walk, a
byte range of a text manifest, a run of row groups of a Parquet manifest); each shard yields its
paths in chunks as it reads them, so a Ray read task can run one shard on a worker and feed the
job as the listing goes, and the driver never sees the paths at all.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .storage import filesystem, is_remote, is_url, protocol_prefix

#: File name endings taken as images when listing a folder or prefix (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Paths per chunk: a Ray block of this many paths carries many detector batches.
CHUNK_PATHS = 4096

#: Bytes of a text manifest per shard: ~100k lines, read by one task.
TEXT_SHARD_BYTES = 8 << 20


class InputError(ValueError):
    """INPUT cannot be listed: missing, unreachable or a malformed manifest."""


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ListingShard:
    """One independently readable piece of a source's listing."""

    source: str
    #: 'folder', 'text', 'parquet' or 'file'.
    kind: str
    #: Text manifests: the byte range [start, stop); Parquet: row groups [start, stop).
    start: int = 0
    stop: int = 0
    index: int = 0

    def chunks(self, storage_options: dict | None = None,
               chunk_paths: int = CHUNK_PATHS) -> Iterator[list[str]]:
        """The shard's paths in lists of at most chunk_paths, as they are read."""
        fs, root = filesystem(self.source, storage_options)
        prefix = protocol_prefix(self.source)
        if self.kind == "folder":
            paths = (prefix + path if prefix else path for path in _walk_images(fs, root))
        elif self.kind == "text":
            paths = _text_range(fs, root, self.source, prefix, self.start, self.stop)
        elif self.kind == "parquet":
            paths = _parquet_groups(fs, root, self.source, prefix, self.start, self.stop)
        else:
            paths = iter([prefix + root if prefix else os.path.abspath(root)])
        chunk: list[str] = []
        for path in paths:
            chunk.append(path)
            if len(chunk) >= chunk_paths:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def plan_shards(source: str, storage_options: dict | None = None) -> list[ListingShard]:
    """Check a source exists and cut its listing into shards (reads headers only, never the list)."""
    try:
        fs, root = filesystem(source, storage_options)
        info = fs.info(root)
    except FileNotFoundError:
        raise InputError(f"INPUT {source} does not exist") from None
    except (OSError, ValueError) as error:
        raise InputError(f"INPUT {source} cannot be read: {_reason(error)}") from None
    if info.get("type") == "directory":
        return [ListingShard(source, "folder")]
    lower = source.lower()
    if lower.endswith(".txt"):
        size = int(info.get("size") or 0)
        starts = range(0, max(size, 1), TEXT_SHARD_BYTES)
        return [ListingShard(source, "text", start, min(start + TEXT_SHARD_BYTES, size), index)
                for index, start in enumerate(starts)]
    if lower.endswith(".parquet"):
        groups = _parquet_row_groups(fs, root, source)
        # About 100k paths per shard; row groups are the unit Parquet can read on its own.
        shards, start, rows = [], 0, 0
        for index, count in enumerate(groups):
            rows += count
            if rows >= 100_000 or index == len(groups) - 1:
                shards.append(ListingShard(source, "parquet", start, index + 1, len(shards)))
                start, rows = index + 1, 0
        return shards or [ListingShard(source, "parquet", 0, 0)]
    # A single file given as INPUT is annotated whatever its name says.
    return [ListingShard(source, "file")]


def first_inputs(shards: list[ListingShard], storage_options: dict | None = None,
                 count: int = 8) -> list[str]:
    """The first count paths of a listing (fewer when it is shorter)."""
    first: list[str] = []
    for shard in shards:
        for chunk in shard.chunks(storage_options, count):
            first += chunk[:count - len(first)]
            break
        if len(first) >= count:
            break
    return first


def probe_listing(shards: list[ListingShard], storage_options: dict | None, policy) -> str | None:
    """jobs.reading.probe_reads on the listing's first paths, listed where this runs."""
    from .reading import probe_reads

    return probe_reads(first_inputs(shards, storage_options), storage_options or {}, policy)


def iter_inputs(source: str, storage_options: dict | None = None,
                chunk_paths: int = CHUNK_PATHS) -> Iterator[list[str]]:
    """Every shard's chunks in order, in this process (for small sources and tools)."""
    for shard in plan_shards(source, storage_options):
        yield from shard.chunks(storage_options, chunk_paths)


def list_inputs(source: str, storage_options: dict | None = None) -> list[str]:
    """All image paths of a source in one list, each once (convenience for small sources)."""
    return list(dict.fromkeys(path for chunk in iter_inputs(source, storage_options) for path in chunk))


def _walk_images(fs, root: str) -> Iterator[str]:
    """Image files under root, streamed: local folders by os.scandir, others by fsspec's walk."""
    if isinstance(fs, LocalFileSystem):
        yield from _scan_local(os.path.abspath(root))
        return
    try:
        for folder, _, files in fs.walk(root, detail=False):
            for name in sorted(files):
                if is_image_name(name):
                    yield posixpath.join(folder, name)
    except OSError as error:
        raise InputError(f"INPUT {root} cannot be listed: {_reason(error)}") from None


def _scan_local(folder: str) -> Iterator[str]:
    # scandir streams a folder's entries without building a list; sorted per folder for a
    # stable order, which keeps chunk contents (and so part names) the same on a retried shard.
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise InputError(f"INPUT {folder} cannot be listed: {_reason(error)}") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _scan_local(entry.path)
        elif is_image_name(entry.name):
            yield entry.path


def _resolve(entry: str, base: str, prefix: str) -> str:
    """A manifest entry made absolute: URIs as written, relative paths against the manifest's folder."""
    if is_url(entry):
        return entry
    if prefix:
        return prefix + posixpath.normpath(posixpath.join(base, entry))
    return os.path.abspath(os.path.join(base, os.path.expanduser(entry)))


def _text_range(fs, root: str, source: str, prefix: str, start: int, stop: int) -> Iterator[str]:
    """Lines that start in [start, stop) of a text manifest (a line belongs to the shard it starts in)."""
    base = posixpath.dirname(root) if prefix else os.path.dirname(root)
    with fs.open(root, "rb") as handle:
        handle.seek(start)
        if start > 0:
            # The line running across the boundary belongs to the shard before.
            handle.seek(start - 1)
            handle.readline()
        while handle.tell() < stop or (stop == 0 and start == 0):
            line = handle.readline()
            if not line:
                break
            try:
                entry = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"manifest {source} is not UTF-8 text with one path per line") from None
            if entry and not entry.startswith("#"):
                yield _resolve(entry, base, prefix)


def _parquet_row_groups(fs, root: str, source: str) -> list[int]:
    """Rows per row group of a Parquet manifest, after checking it has a 'path' column."""
    try:
        with fs.open(root, "rb") as handle:
            manifest = pq.ParquetFile(handle)
            names = manifest.schema_arrow.names
            if "path" not in names:
                raise InputError(f"manifest {source} has no 'path' column (it has {', '.join(names)})")
            return [manifest.metadata.row_group(i).num_rows for i in range(manifest.num_row_groups)]
    except InputError:
        raise
    except Exception as error:  # pyarrow raises several types for a malformed file
        raise InputError(f"manifest {source} is not a readable Parquet file: {_reason(error)}") from None


def _parquet_groups(fs, root: str, source: str, prefix: str, start: int, stop: int) -> Iterator[str]:
    base = posixpath.dirname(root) if prefix else os.path.dirname(root)
    with fs.open(root, "rb") as handle:
        manifest = pq.ParquetFile(handle)
        for group in range(start, stop):
            column = manifest.read_row_group(group, columns=["path"]).column("path")
            for path in column.to_pylist():
                if path:
                    yield _resolve(path, base, prefix)


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type when there is none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


__all__ = ["CHUNK_PATHS", "IMAGE_EXTENSIONS", "InputError", "ListingShard", "is_image_name",
           "is_remote", "iter_inputs", "list_inputs", "plan_shards"]
