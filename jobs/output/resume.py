"""Resuming an OUTPUT: which paths its committed parts already hold for good, and which to redo.

One scan serves every job that writes parts (annotate: one row per image; crops: one per face):
- rows that are not final (a transient error, a worker that died on the image, or any error with
  retry_errors) leave their part, rewritten in place atomically, *before* they are redone, so
  no path ever has two rows; a kill in between only redoes them;
- a path found in two parts (left by a failure this protocol did not foresee) keeps the rows of
  the first part in name order, and leaves the others: the scan repairs, it does not refuse;
- the paths held are returned as sorted 16-byte digests (160 MB at 10 million), the resume index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common.schema import ErrorKind
from jobs.common.storage import filesystem
from jobs.output.parts import commit_file, parquet_bytes, read_part
from jobs.output.store import StorePatience, retry_store

#: Columns the scan reads from every part; the rest only from a part it rewrites.
SCAN_COLUMNS = ["path", "error", "error_kind"]


def path_digests(paths: list[str]) -> np.ndarray:
    """16-byte digests of paths as a numpy 'S16' array."""
    return np.array([hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                     for p in paths], dtype="S16")


def redo_mask(table: pa.Table, retry_errors: bool) -> pa.Array:
    """Which rows of a part are not final: any error but a permanent one, or every error with retry_errors."""
    error = table.column("error")
    if retry_errors:
        return pc.is_valid(error)
    if "error_kind" in table.column_names:
        kind = table.column("error_kind")
        return pc.and_(pc.is_valid(error), pc.fill_null(pc.not_equal(kind, ErrorKind.PERMANENT.value), True))
    # Parts written before error_kind existed: their error rows were final then, and stay so.
    return pa.array(np.zeros(table.num_rows, dtype=bool))


@dataclass
class ResumeIndex:
    """What a scan of OUTPUT found."""

    #: Sorted digests of the paths that committed parts hold with final rows.
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S16"))
    #: Rows taken out of their parts to be redone.
    redo: int = 0
    #: Paths whose worker died on them in an earlier run: this run tries each of them alone.
    crashed: list[str] = field(default_factory=list)
    #: Rows of paths that another part held too, taken out.
    duplicates: int = 0
    parts: int = 0


def scan_parts(output: str, storage_options: dict | None, parts: list[str], retry_errors: bool = False,
               rewrite: bool = True, patience: StorePatience = StorePatience()) -> ResumeIndex:
    """Index the final rows of committed parts; with rewrite, take the rows to redo (and rows of
    paths held twice) out of their parts. Without rewrite (a rebuild mid-run) every row counts as done."""
    fs, _ = filesystem(output, storage_options)
    index = ResumeIndex(parts=len(parts))
    kept_paths: list[list[str]] = []
    for path in parts:
        table = retry_store(lambda path=path: read_part(fs, path, SCAN_COLUMNS), f"reading {path}", patience)
        if rewrite:
            mask = redo_mask(table, retry_errors)
            count = int(pc.sum(mask).as_py() or 0)
            if count:
                redone = table.filter(mask)
                index.crashed += [p for p, kind in zip(redone.column("path").to_pylist(),
                                                       redone.column("error_kind").to_pylist())
                                  if kind == ErrorKind.CRASHED.value]
                _rewrite(output, storage_options, fs, path, pc.invert(mask), patience)
                index.redo += count
                table = table.filter(pc.invert(mask))
        kept_paths.append(table.column("path").to_pylist())
    per_part = [np.unique(path_digests(paths)) for paths in kept_paths]
    if rewrite:
        index.duplicates = _drop_repeats(output, storage_options, fs, parts, per_part, patience)
    index.done = np.unique(np.concatenate(per_part)) if per_part else index.done
    return index


def _drop_repeats(output, storage_options, fs, parts, per_part, patience) -> int:
    """Take a path's rows out of every part but the first that holds it; rows taken out."""
    if len(per_part) < 2:
        return 0
    digests = np.concatenate(per_part)
    owners = np.concatenate([np.full(len(d), i) for i, d in enumerate(per_part)])
    order = np.lexsort((owners, digests))
    repeated = np.zeros(len(digests), dtype=bool)
    repeated[order[1:]] = digests[order[1:]] == digests[order[:-1]]
    removed = 0
    for part in np.unique(owners[repeated]):
        drop = digests[repeated & (owners == part)]
        table = retry_store(lambda: read_part(fs, parts[part], ["path"]), f"reading {parts[part]}", patience)
        keep = pa.array(~np.isin(path_digests(table.column("path").to_pylist()), drop))
        removed += int(table.num_rows - pc.sum(keep).as_py())
        _rewrite(output, storage_options, fs, parts[part], keep, patience)
        per_part[part] = np.setdiff1d(per_part[part], drop)
    return removed


def _rewrite(output, storage_options, fs, path: str, keep: pa.Array, patience: StorePatience) -> None:
    """Rewrite a part with only the rows `keep` marks (atomically), or remove it if none remain."""
    full = retry_store(lambda: read_part(fs, path), f"reading {path}", patience)
    kept = full.filter(keep)
    name = path.rsplit("/", 1)[-1]
    if kept.num_rows:
        retry_store(lambda: commit_file(output, name, parquet_bytes(kept), storage_options),
                    f"rewriting {path}", patience)
    else:
        retry_store(lambda: fs.rm_file(path), f"removing {path}", patience)
