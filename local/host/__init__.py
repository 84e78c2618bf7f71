"""A local Azure Functions host for this app (Core Tools cannot be installed offline).

It indexes the app exactly as the real host does — through ``azure.functions``' own metadata
(``app.get_functions()`` and each function's bindings) — and then serves HTTP triggers, polls queue
triggers on Azurite with host.json semantics and fires NCRONTAB timers. See docs/local-host.md for
what it does not do compared to the real host. Never deployed (.funcignore keeps ``local/`` out).
"""

from .config import HostConfig, LocalSettings, QueuesOptions, load_host_json, load_local_settings
from .host import FunctionsHost, HostOptions

__all__ = [
    "FunctionsHost",
    "HostConfig",
    "HostOptions",
    "LocalSettings",
    "QueuesOptions",
    "load_host_json",
    "load_local_settings",
]
