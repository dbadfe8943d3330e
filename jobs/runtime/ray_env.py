"""Connecting to Ray: an embedded local instance, or a cluster at an address."""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Start an embedded local Ray (no address) or connect to a cluster; no-op if connected.

    The local instance runs without the dashboard (its start-up and background CPU matter on small
    machines) unless `dashboard`: Ray Train needs it, as its placement-group cleaner polls the
    State API that the dashboard serves, and warns every few seconds without it.
    """
    if ray.is_initialized():
        return
    # ray.init installs its own SIGTERM handler, which exits at once (status 15): the command's
    # handler (a stop that commits what is made, then exit status 130) is put back after it.
    on_main_thread = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        _init(address, num_cpus, dashboard)
    finally:
        if on_main_thread and saved is not None:
            signal.signal(signal.SIGTERM, saved)


def _init(address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # None starts the dashboard where its dependencies are installed (ray[default]). Workers
        # mask credentials in what they log, as the CLI does (a cluster's jobs get this from
        # submit's runtime environment instead: one given here would replace the job's).
        ray.init(num_cpus=num_cpus, include_dashboard=None if dashboard else False,
                 runtime_env={"worker_process_setup_hook": "jobs.common.redaction.install_log_redaction"},
                 **kwargs)
