"""The annotate run's shared state, in one small Ray actor: what is done, counts, and a crash journal.

The driver holds none of it. Paths are known by 16-byte digests:
- *done*: the paths that committed parts already hold with a final row, sorted in one numpy array
  (16 bytes a path: 160 MB at 10 million), for resume;
- *claims*: for manifests, the paths handed out in this run, so a path listed twice is annotated
  once. A claim names the chunk that made it, so a retried listing task gets its own paths back;
- counts for the progress line (a chunk counted once, however often its task is retried), and
  whether the listing has finished (so the total is known);
- the crash journal: which images a detector call was working on when its worker died. An image
  that was in flight at MAX_STRIKES deaths gets a 'crashed' row (redone alone by the next run)
  instead of killing the job forever; one that crashed in an earlier run too gets a final row.

The actor lives on the driver's node (the job ends with that node anyway) and is restarted by Ray
if its process dies: a restarted actor rebuilds *done* from the committed parts, which then hold
every row this run committed, so nothing committed is done twice. What it loses is said where
it matters: claims (a manifest's repeated path listed again after the restart is annotated twice,
and the next run's scan keeps one of the two rows) and the journal's strikes.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from jobs.output.parts import committed_parts
from jobs.output.resume import scan_parts

#: Worker deaths with an image in flight after which that image is given up for this run.
MAX_STRIKES = 2


class RunState:
    """Ray actor (threaded): the run's resume index, claims, progress counts and crash journal."""

    def __init__(self, dedupe: bool, output: str | None = None, storage_options: dict | None = None,
                 shards: int = 0) -> None:
        self._lock = threading.Lock()
        self._done = np.zeros(0, dtype="S16")
        self._dedupe = dedupe
        self._claims: dict[bytes, str] = {}
        self._chunks: dict[str, tuple[int, int, int]] = {}
        self._counts = {"images": 0, "faces": 0, "errors": 0, "transient": 0, "shards_listed": 0}
        self._shards = shards
        self._in_flight: dict[str, list[str]] = {}
        self._strikes: dict[str, int] = {}
        self._crashed_before: set[str] = set()
        self.started = time.time()
        import ray

        if output is not None and ray.is_initialized() and _restarted():
            # Restarted after its process died: every row this run committed is in OUTPUT now.
            self._done = scan_parts(output, storage_options, committed_parts(output, storage_options),
                                    rewrite=False).done

    # -- resume ------------------------------------------------------------------------------

    def scan(self, output: str, storage_options: dict, parts: list[str], retry_errors: bool) -> dict:
        """jobs.output.resume.scan_parts, run here so the resume index never passes the driver."""
        index = scan_parts(output, storage_options, parts, retry_errors)
        with self._lock:
            self._done = index.done
            self._crashed_before = set(index.crashed)
        return {"done": int(len(index.done)), "redo": index.redo, "crashed": len(index.crashed),
                "duplicates": index.duplicates}

    def probe(self, shards: list, storage_options: dict, policy) -> str | None:
        """jobs.inputs.sources.probe_listing, run here: this actor is a worker already, and one process
        fewer to start matters on small machines."""
        from jobs.inputs.sources import probe_listing

        return probe_listing(shards, storage_options, policy)

    def claim(self, digests: np.ndarray, chunk: str) -> np.ndarray:
        """Which of a chunk's paths are this run's to annotate (not done, not handed out before)."""
        with self._lock:
            new = np.ones(len(digests), dtype=bool)
            if len(self._done):
                at = np.minimum(np.searchsorted(self._done, digests), len(self._done) - 1)
                new &= self._done[at] != digests
            done = int(len(digests) - new.sum())
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
            # A retried listing task claims its chunks again: they are counted once.
            self._chunks[chunk] = (len(digests), done, int(len(digests) - done - new.sum()))
            return new

    def ahead(self) -> int:
        """Paths handed out to annotate that are not annotated yet."""
        with self._lock:
            listed, done, repeated = self._listing()
            return listed - done - repeated - self._counts["images"]

    def _listing(self) -> tuple[int, int, int]:
        """(paths listed, already done, listed again), each chunk counted once."""
        totals = np.array(list(self._chunks.values()), dtype=np.int64).reshape(-1, 3).sum(axis=0)
        return int(totals[0]), int(totals[1]), int(totals[2])

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
            counts["listed"], counts["skipped"], counts["repeated"] = self._listing()
        counts["listing_complete"] = self._shards > 0 and counts["shards_listed"] >= self._shards
        return counts

    # -- crash journal -----------------------------------------------------------------------

    def start(self, token: str, paths: list[str]) -> dict[str, tuple[int, bool]]:
        """Begin (or retry) a batch: per path with a history, (deaths in this run, crashed in an
        earlier run too), counting a death that cut a try of this batch short."""
        with self._lock:
            for path in self._in_flight.pop(token, []):
                self._strikes[path] = self._strikes.get(path, 0) + 1
            return {path: (self._strikes.get(path, 0), path in self._crashed_before) for path in paths
                    if path in self._strikes or path in self._crashed_before}

    def working_on(self, token: str, paths: list[str]) -> None:
        """The images a batch's worker is about to decode and detect."""
        with self._lock:
            self._in_flight[token] = list(paths)

    def finish(self, token: str) -> None:
        """A batch completed: nothing of it is in flight."""
        with self._lock:
            self._in_flight.pop(token, None)


def _restarted() -> bool:
    """Whether this actor is a restart (its process died); Ray's answer, without its deprecation noise."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
