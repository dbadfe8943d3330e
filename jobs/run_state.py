"""The annotate run's shared state, in one small Ray actor: what is done, counts, and a crash journal.

The driver holds none of it. Paths are known by 16-byte digests:
- *done*: the paths that committed parts already hold with a final row, sorted in one numpy array
  (16 bytes a path: 160 MB at 10 million), for resume;
- *claims*: for manifests, the paths handed out in this run, so a path listed twice is annotated
  once. A claim names the chunk that made it, so a retried listing task gets its own paths back;
- counts for the progress line, and whether the listing has finished (so the total is known);
- the crash journal: which images a detector call was working on when its worker died. An image
  that was in flight at MAX_STRIKES deaths becomes an error row instead of killing the job forever.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .parts import commit_file, parquet_bytes
from .reading import PERMANENT
from .storage import filesystem

#: Worker deaths with an image in flight after which that image is given up as poison.
MAX_STRIKES = 2


def path_digests(paths: list[str]) -> np.ndarray:
    """16-byte digests of paths as a numpy 'S16' array."""
    return np.array([hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                     for p in paths], dtype="S16")


def redo_mask(table: pa.Table, retry_errors: bool) -> pa.Array:
    """Which rows of a part are not final: transient errors, or every error with retry_errors."""
    error = table.column("error")
    if retry_errors:
        return pc.is_valid(error)
    if "error_kind" in table.column_names:
        kind = table.column("error_kind")
        return pc.and_(pc.is_valid(error), pc.fill_null(pc.not_equal(kind, PERMANENT), True))
    # Parts written before error_kind existed: their error rows were final then, and stay so.
    return pa.array(np.zeros(table.num_rows, dtype=bool))


class RunState:
    """Ray actor (threaded): the run's resume index, claims, progress counts and crash journal."""

    def __init__(self, dedupe: bool) -> None:
        self._lock = threading.Lock()
        self._done = np.zeros(0, dtype="S16")
        self._dedupe = dedupe
        self._claims: dict[bytes, int] = {}
        self._counts = {"listed": 0, "skipped": 0, "images": 0, "faces": 0, "errors": 0,
                        "transient": 0, "shards_listed": 0}
        self._shards = 0
        self._in_flight: dict[str, list[str]] = {}
        self._strikes: dict[str, int] = {}
        self.started = time.time()

    # -- resume ------------------------------------------------------------------------------

    def scan(self, output: str, storage_options: dict, parts: list[str], retry_errors: bool) -> dict:
        """Index the final rows of committed parts; rewrite parts without their rows to redo."""
        fs, _ = filesystem(output, storage_options)
        done, redo, rewritten = [], 0, 0
        for path in parts:
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            mask = redo_mask(table, retry_errors)
            count = int(pc.sum(mask).as_py() or 0)
            if count:
                # The rows to redo leave the part (rewritten in place, atomically) before they
                # are redone, so no path ever has two rows; a kill in between only redoes them.
                kept = table.filter(pc.invert(mask))
                name = path.rsplit("/", 1)[-1]
                if kept.num_rows:
                    commit_file(output, name, parquet_bytes(kept), storage_options)
                else:
                    fs.rm_file(path)
                redo += count
                rewritten += 1
                table = kept
            done.append(path_digests(table.column("path").to_pylist()))
        with self._lock:
            self._done = np.sort(np.concatenate(done)) if done else self._done
        return {"done": int(len(self._done)), "redo": redo, "rewritten": rewritten}

    def probe(self, shards: list, storage_options: dict, policy) -> str | None:
        """jobs.sources.probe_listing, run here: this actor is a worker already, and one process
        fewer to start matters on small machines."""
        from .sources import probe_listing

        return probe_listing(shards, storage_options, policy)

    def plan(self, shards: int) -> None:
        """How many listing shards the run has (the total is known once all have reported)."""
        self._shards = shards

    def claim(self, digests: np.ndarray, chunk: str) -> np.ndarray:
        """Which of a chunk's paths are this run's to annotate (not done, not handed out before)."""
        with self._lock:
            new = np.ones(len(digests), dtype=bool)
            if len(self._done):
                at = np.minimum(np.searchsorted(self._done, digests), len(self._done) - 1)
                new &= self._done[at] != digests
            if self._dedupe:
                for index, digest in enumerate(digests.tolist()):
                    if not new[index]:
                        continue
                    owner = self._claims.setdefault(digest, chunk)
                    new[index] = owner == chunk
                # A path twice in one chunk: only its first place counts.
                _, first = np.unique(digests, return_index=True)
                once = np.zeros(len(digests), dtype=bool)
                once[first] = True
                new &= once
            self._counts["listed"] += len(digests)
            self._counts["skipped"] += int(len(digests) - new.sum())
            return new

    def ahead(self) -> int:
        """Paths handed out to annotate that are not annotated yet."""
        with self._lock:
            return self._counts["listed"] - self._counts["skipped"] - self._counts["images"]

    def shard_listed(self) -> None:
        """One listing shard has been read to its end."""
        with self._lock:
            self._counts["shards_listed"] += 1

    # -- progress ----------------------------------------------------------------------------

    def add(self, images: int, faces: int, errors: int, transient: int) -> None:
        """Count annotated rows (made, not yet committed)."""
        with self._lock:
            self._counts["images"] += images
            self._counts["faces"] += faces
            self._counts["errors"] += errors
            self._counts["transient"] += transient

    def snapshot(self) -> dict:
        """The counts, and whether the listing is complete."""
        with self._lock:
            counts = dict(self._counts)
        counts["listing_complete"] = self._shards > 0 and counts["shards_listed"] >= self._shards
        return counts

    # -- crash journal -----------------------------------------------------------------------

    def start(self, token: str, paths: list[str]) -> dict[str, int]:
        """Begin (or retry) a batch: strikes per path, counting a death that cut a try short."""
        with self._lock:
            for path in self._in_flight.pop(token, []):
                self._strikes[path] = self._strikes.get(path, 0) + 1
            return {path: self._strikes[path] for path in paths if path in self._strikes}

    def working_on(self, token: str, paths: list[str]) -> None:
        """The images a batch's worker is about to decode and detect."""
        with self._lock:
            self._in_flight[token] = list(paths)

    def finish(self, token: str) -> None:
        """A batch completed: nothing of it is in flight."""
        with self._lock:
            self._in_flight.pop(token, None)
