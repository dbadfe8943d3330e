"""What to annotate, streamed: image paths under a folder or prefix, or in a manifest, in chunks.

Nothing here holds a whole listing. A source is cut into `ListingShard`s (a whole folder walk, a
byte range of a text manifest, a run of row groups of a Parquet manifest); each shard yields its
paths in chunks as it reads them, so a Ray read task can run one shard on a worker and feed the
job as the listing goes, and the driver never sees the paths at all.

A listing never drops an entry it cannot turn into a readable path, and never stops on one: such
an entry (a file name that is not UTF-8, a manifest line or row that is not text, a folder that
cannot be read, a link that loops back) becomes one `Unlisted` item in its place, which the job
records as an error row. Only INPUT itself missing or unreadable is an InputError.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Iterator, Union

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from jobs.common.storage import filesystem, is_remote, is_url, protocol_prefix

#: File name endings taken as images when listing a folder or prefix (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Paths per chunk: a Ray block of this many paths carries many detector batches.
CHUNK_PATHS = 4096

#: Bytes of a text manifest per shard: ~100k lines, read by one task.
TEXT_SHARD_BYTES = 8 << 20

#: What Notepad and PowerShell put before UTF-8 text; not part of the first path.
UTF8_BOM = b"\xef\xbb\xbf"

#: Why a path whose bytes are not UTF-8 gets an error row rather than a read.
NOT_UTF8_NAME = ("file name is not valid UTF-8 (the bytes that are not are shown as \\xNN); rename it "
                 "to UTF-8, e.g. convmv -f latin1 -t utf8 --notest FILE, and run again")


class InputError(ValueError):
    """INPUT cannot be listed: missing, unreachable or a malformed manifest."""


@dataclass(frozen=True)
class Unlisted:
    """An entry of a listing that is not a readable path: it gets one error row naming it."""

    name: str    # valid UTF-8 text that names the entry for a person
    reason: str  # one line


#: One item of a listing chunk: a path to read, or an entry that only gets an error row.
Entry = Union[str, Unlisted]


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
               chunk_paths: int = CHUNK_PATHS) -> Iterator[list[Entry]]:
        """The shard's entries in lists of at most chunk_paths, as they are read.

        Each item is a path (str) or an Unlisted entry; every path and name encodes as UTF-8.
        """
        fs, root = filesystem(self.source, storage_options)
        prefix = protocol_prefix(self.source)
        if self.kind == "folder":
            entries = (prefix + entry if prefix and isinstance(entry, str) else entry
                       for entry in _walk_images(fs, root))
        elif self.kind == "text":
            entries = _text_range(fs, root, self.source, prefix, self.start, self.stop)
        elif self.kind == "parquet":
            entries = _parquet_groups(fs, root, self.source, prefix, self.start, self.stop)
        else:
            entries = iter([prefix + root if prefix else os.path.abspath(root)])
        chunk: list[Entry] = []
        for entry in entries:
            chunk.append(_utf8_entry(entry))
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
        _check_not_utf16(fs, root, source)
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
    """The first count paths of a listing (fewer when it is shorter), Unlisted entries skipped.

    Only each shard's first chunk is looked at: a shard that starts with count Unlisted entries
    adds no path, rather than being read on for one.
    """
    first: list[str] = []
    for shard in shards:
        for chunk in shard.chunks(storage_options, count):
            first += [entry for entry in chunk if isinstance(entry, str)][:count - len(first)]
            break
        if len(first) >= count:
            break
    return first


def probe_listing(shards: list[ListingShard], storage_options: dict | None, policy) -> str | None:
    """jobs.inputs.reading.probe_reads on the listing's first paths, listed where this runs."""
    from jobs.inputs.reading import probe_reads

    return probe_reads(first_inputs(shards, storage_options), storage_options or {}, policy)


def iter_inputs(source: str, storage_options: dict | None = None,
                chunk_paths: int = CHUNK_PATHS) -> Iterator[list[Entry]]:
    """Every shard's chunks in order, in this process (for small sources and tools).

    Chunks hold paths and Unlisted entries, as ListingShard.chunks yields them.
    """
    for shard in plan_shards(source, storage_options):
        yield from shard.chunks(storage_options, chunk_paths)


def list_entries(source: str, storage_options: dict | None = None) -> list[Entry]:
    """Every entry of a source in listing order, Unlisted ones included, repeats kept."""
    return [entry for chunk in iter_inputs(source, storage_options) for entry in chunk]


def list_inputs(source: str, storage_options: dict | None = None) -> list[str]:
    """All readable image paths of a source in one list, each once (for small sources).

    Unlisted entries are left out: list_entries has them.
    """
    return list(dict.fromkeys(entry for entry in list_entries(source, storage_options)
                              if isinstance(entry, str)))


def _walk_images(fs, root: str) -> Iterator[Entry]:
    """Image files under root, streamed and in a stable order: local folders by os.scandir,
    S3 prefixes by the store's key listing, other stores by fsspec's find."""
    if isinstance(fs, LocalFileSystem):
        yield from _scan_local(os.path.abspath(root))
        return
    try:
        for key in _store_keys(fs, root):
            if is_image_name(key):
                yield key
    except OSError as error:
        raise InputError(f"INPUT {root} cannot be listed: {_reason(error)}") from None


def _store_keys(fs, root: str) -> Iterator[str]:
    """Every object name under a prefix, keys with '//' in them included (fsspec's walk drops them).

    Keys, not folders: 'in//a.jpg' is a key like any other, and walking it as folder 'in/' then
    folder '' loses it. On S3 the keys stream page by page (1,000 a request) in the order S3
    lists them, UTF-8 byte order, so no listing is ever held whole. Other stores, and S3 Express
    directory buckets (which list in no set order), have no streaming form that keeps an order:
    their find returns the whole listing at once, sorted, as names only to keep it small.
    """
    from s3fs import S3FileSystem

    from jobs.output.store import retry_store

    if not isinstance(fs, S3FileSystem) or fs.split_path(root)[0].endswith("--x-s3"):
        yield from fs.find(root, withdirs=False, detail=False)
        return
    bucket, key, _ = fs.split_path(root)
    # No delimiter: one flat listing of every key under the prefix, whatever its slashes. Each
    # page is one request, retried on its own while the store does not answer.
    request = {"Bucket": bucket, "Prefix": key + "/" if key else "", "MaxKeys": 1000}
    while True:
        page = retry_store(lambda: fs.call_s3("list_objects_v2", **request), f"listing {root}")
        for item in page.get("Contents", []):
            yield f"{bucket}/{item['Key']}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _scan_local(root: str) -> Iterator[Entry]:
    """Image files under a local folder, depth first in name order (a stable order keeps chunk
    contents, and so part names, the same on a retried shard).

    A stack of folders being read, not recursion: folders nested deeper than Python's recursion
    limit are listed too. A folder that is one of the folders it is inside of (a symlink or bind
    mount back to an ancestor, told by its device and inode) is not entered and becomes one
    Unlisted entry; so does a sub-folder or entry that cannot be read, and the listing goes on.
    Only root itself unreadable is an InputError.
    """
    try:
        stack = [(iter(_sorted_entries(root)), _identity(os.stat(root)))]
    except OSError as error:
        raise InputError(f"INPUT {_printable(root)} cannot be listed: {_os_reason(error)}") from None
    # The folders being read, by identity: the ones a loop would lead back to.
    open_folders = {stack[0][1]: root}
    while stack:
        entries, identity = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            del open_folders[identity]
            continue
        try:
            folder = _identity(entry.stat()) if entry.is_dir() else None
        except OSError as error:
            yield Unlisted(_printable(entry.path), f"cannot be read: {_os_reason(error)}")
            continue
        if folder is None:
            if is_image_name(entry.name):
                yield entry.path
        elif folder in open_folders:
            yield Unlisted(_printable(entry.path), f"a link back to {_printable(open_folders[folder])}, "
                           "a folder it is inside of (a loop); not followed")
        else:
            try:
                stack.append((iter(_sorted_entries(entry.path)), folder))
            except OSError as error:
                yield Unlisted(_printable(entry.path), f"folder cannot be listed: {_os_reason(error)}")
                continue
            open_folders[folder] = entry.path


def _sorted_entries(folder: str) -> list[os.DirEntry]:
    """A folder's entries by name: scandir streams them, then one folder's worth is sorted."""
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    """What tells one folder from another whatever path leads to it."""
    return stat.st_dev, stat.st_ino


def _resolve(entry: str, base: str, prefix: str) -> str:
    """A manifest entry made absolute: URIs as written, relative paths against the manifest's folder."""
    if is_url(entry):
        return entry
    if prefix:
        return prefix + posixpath.normpath(posixpath.join(base, entry))
    return os.path.abspath(os.path.join(base, os.path.expanduser(entry)))


def _check_not_utf16(fs, root: str, source: str) -> None:
    """Refuse a UTF-16 text manifest (Windows PowerShell 5's '>' writes one): every line of it
    would be an error row."""
    start = fs.cat_file(root, start=0, end=2)  # a ranged read: not a whole block of a big file
    if start in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"manifest {source} is UTF-16 text; save it as UTF-8, one path per line")


def _text_range(fs, root: str, source: str, prefix: str, start: int, stop: int) -> Iterator[Entry]:
    """Lines that start in [start, stop) of a text manifest (a line belongs to the shard it starts in).

    A line that is not UTF-8 becomes Unlisted '<manifest>:<line number>', lines counted from 1
    over the whole file. A shard that starts after byte 0 counts the lines before it only when
    it meets such a line (one read of the file up to its start), so UTF-8 manifests cost nothing.
    """
    base = posixpath.dirname(root) if prefix else os.path.dirname(root)
    with fs.open(root, "rb") as handle:
        handle.seek(start)
        if start > 0:
            # The line running across the boundary belongs to the shard before.
            handle.seek(start - 1)
            handle.readline()
        first_offset, first_number, lines = handle.tell(), None, 0
        while handle.tell() < stop or (stop == 0 and start == 0):
            line = handle.readline()
            if not line:
                break
            if lines == 0 and first_offset == 0:
                line = line.removeprefix(UTF8_BOM)
            lines += 1
            try:
                entry = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                if first_number is None:
                    first_number = _line_number(fs, root, first_offset)
                yield Unlisted(f"{_printable(source)}:{first_number + lines - 1}",
                               "manifest line is not UTF-8 text; save the manifest as UTF-8")
                continue
            if entry and not entry.startswith("#"):
                yield _resolve(entry, base, prefix)


def _line_number(fs, root: str, offset: int) -> int:
    """The number (from 1) of the line starting at byte offset of a file: 1 + newlines before it."""
    newlines, block = 0, 1 << 20
    with fs.open(root, "rb") as handle:
        while handle.tell() < offset:
            data = handle.read(min(block, offset - handle.tell()))
            if not data:
                break
            newlines += data.count(b"\n")
    return newlines + 1


def _parquet_row_groups(fs, root: str, source: str) -> list[int]:
    """Rows per row group of a Parquet manifest, after checking it has a text 'path' column."""
    try:
        with fs.open(root, "rb") as handle:
            manifest = pq.ParquetFile(handle)
            schema = manifest.schema_arrow
            if "path" not in schema.names:
                raise InputError(f"manifest {source} has no 'path' column (it has {', '.join(schema.names)})")
            kind = schema.field("path").type
            if not _is_path_type(kind):
                raise InputError(f"manifest {source} has a 'path' column of type {kind}; "
                                 "it must be text (string or UTF-8 binary)")
            return [manifest.metadata.row_group(i).num_rows for i in range(manifest.num_row_groups)]
    except InputError:
        raise
    except Exception as error:  # pyarrow raises several types for a malformed file
        raise InputError(f"manifest {source} is not a readable Parquet file: {_reason(error)}") from None


def _is_path_type(kind: pa.DataType) -> bool:
    """Whether a column of this Arrow type holds paths: text, or bytes to decode as UTF-8."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _parquet_groups(fs, root: str, source: str, prefix: str, start: int, stop: int) -> Iterator[Entry]:
    """Paths of row groups [start, stop) of a Parquet manifest; nulls and empty values skipped.

    A binary value that is not UTF-8 becomes Unlisted '<manifest>:row <n>', n counted from 0 over
    the whole file (a DataFrame's index, DuckDB's OFFSET).
    """
    base = posixpath.dirname(root) if prefix else os.path.dirname(root)
    with fs.open(root, "rb") as handle:
        manifest = pq.ParquetFile(handle)
        first = sum(manifest.metadata.row_group(i).num_rows for i in range(start))
        for group in range(start, stop):
            column = manifest.read_row_group(group, columns=["path"]).column("path")
            for row, path in enumerate(column.to_pylist(), first):
                if isinstance(path, bytes):
                    try:
                        path = path.decode("utf-8")
                    except UnicodeDecodeError:
                        yield Unlisted(f"{_printable(source)}:row {row}", "path is not UTF-8 text")
                        continue
                if path:
                    yield _resolve(path, base, prefix)
            first += len(column)


def _utf8_entry(entry: Entry) -> Entry:
    """The entry, or an Unlisted one when a path is not UTF-8 (a file name in Latin-1 on a UTF-8
    system reaches Python as lone surrogates, which no Arrow string column can hold)."""
    if isinstance(entry, Unlisted):
        return entry
    try:
        entry.encode("utf-8")
    except UnicodeEncodeError:
        return Unlisted(_printable(entry), NOT_UTF8_NAME)
    return entry


def _printable(path: str) -> str:
    """A path as UTF-8 text: bytes that are not UTF-8 shown as \\xNN (os.fsencode gives them back)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _os_reason(error: OSError) -> str:
    """An OSError's reason without the path it quotes (which need not be UTF-8)."""
    return error.strerror or _reason(error)


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type when there is none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


__all__ = ["CHUNK_PATHS", "IMAGE_EXTENSIONS", "Entry", "InputError", "ListingShard", "Unlisted",
           "is_image_name", "is_remote", "iter_inputs", "list_entries", "list_inputs", "plan_shards"]
