"""One live progress line for a running job, read from the run's state actor."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


def format_progress(counts: dict, seconds: float) -> str:
    """'1,234 / 10,000 images (12%), 45.6 images/s, 789 faces, 3 errors, ETA 3 min 12 s'."""
    images, rate = counts["images"], counts["images"] / seconds if seconds > 0 else 0.0
    total = counts["listed"] - counts["skipped"] if counts.get("listing_complete") else None
    text = f"{images:,}"
    if total is not None:
        text += f" / {total:,} images ({100 * images / total:.0f}%)" if total else " / 0 images"
    else:
        text += f" images (listed so far: {counts['listed'] - counts['skipped']:,} to do)"
    text += f", {rate:.1f} images/s, {counts['faces']:,} faces, {counts['errors']:,} errors"
    if total is not None and rate > 0 and total > images:
        left = (total - images) / rate
        text += f", ETA {int(left // 60)} min {int(left % 60)} s" if left >= 60 else f", ETA {left:.0f} s"
    return text


class ProgressLine:
    """Polls the run state each second: a live line on a terminal, a log line every 30 s otherwise."""

    def __init__(self, state, summary, show: bool, on_change: Callable | None = None,
                 log_every: float = 30.0) -> None:
        self.state, self.summary, self.show, self.on_change = state, summary, show, on_change
        self.log_every = log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._tty = sys.stderr.isatty()
        self._started = time.perf_counter()

    def start(self) -> None:
        """Begin polling in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; end the live line."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.show and self._tty:
            print(file=sys.stderr)

    def _run(self) -> None:
        import ray

        last_images, last_log = -1, time.perf_counter()
        while not self._stop.wait(1.0):
            try:
                counts = ray.get(self.state.snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is best effort; the job goes on
                continue
            line = format_progress(counts, time.perf_counter() - self._started)
            if self.show and self._tty:
                print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
            elif self.show and time.perf_counter() - last_log >= self.log_every:
                last_log = time.perf_counter()
                log.info("%s", line)
            if counts["images"] != last_images:
                last_images = counts["images"]
                if self.on_change is not None:
                    self.summary.listed, self.summary.skipped = counts["listed"], counts["skipped"]
                    snapshot = type(self.summary)(**{**vars(self.summary), "images": counts["images"]})
                    self.on_change(snapshot)
