"""Ray Data's global settings for a job, set on entry and restored on exit, in one place.

Jobs run in process beside other code (`evaluate --ray` runs annotate; tests run many jobs in one
Ray session), so a setting a job needs must not outlive it. One rule for progress bars: each job
shows its own progress line, and Ray Data's operator bars come back with RAY_DATA_PROGRESS=1.
"""

from __future__ import annotations

import contextlib
import os


def progress_bars_wanted() -> bool:
    """Whether Ray Data's own operator bars are asked for (RAY_DATA_PROGRESS=1)."""
    return bool(int(os.environ.get("RAY_DATA_PROGRESS", "0") or 0))


@contextlib.contextmanager
def ray_data_context(block_size: int | None = None, list_files_on_driver: bool = False):
    """Ray Data's context for one job: unordered output, the progress-bar rule, and optionally
    the block size at which read tasks cut their output and file listing done by the driver.

    A Dataset keeps the context it was made in, so a dataset made inside this block and run
    later (by Ray Train's workers) runs with these settings."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.execution_options.preserve_order,
             context.target_max_block_size, context.use_datasource_v2)
    context.enable_progress_bars = progress_bars_wanted()
    context.execution_options.preserve_order = False
    if block_size is not None:
        # Ray Data buffers a read task's output until it reaches target_max_block_size (128 MB):
        # a listing would be one block, and nothing would flow until it was whole.
        context.target_max_block_size = block_size
    if list_files_on_driver:
        # Ray Data's newer file sources list files in a task that asks for a whole CPU, whatever
        # the read is given: where training workers hold every CPU left (after a node is lost),
        # that task never runs and the training waits forever. The older sources list in the
        # driver, and their read tasks take the resources the read is given.
        context.use_datasource_v2 = False
    try:
        yield context
    finally:
        (context.enable_progress_bars, context.execution_options.preserve_order,
         context.target_max_block_size, context.use_datasource_v2) = saved
