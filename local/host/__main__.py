"""``python -m local.host --port 7071 [--app-module function_app] [--script-root .] [--settings FILE]``.

Order matters and mirrors Core Tools + the worker: read local.settings.json and put ``Values`` in the
environment *before* importing the app, then index, then start triggers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .config import HostConfigError, apply_values, load_host_json, load_local_settings
from .discovery import find_app, index_app, load_app_module
from .host import FunctionsHost, HostOptions, PortInUseError
from .invoke import current_invocation_id
from .keys import load_or_create_keys

log = logging.getLogger("Host")


class _InvocationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        inv = current_invocation_id.get()
        record.invocation = f" [{inv[:8]}]" if inv else ""
        return True


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_InvocationFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s%(invocation)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The format above (the host's only handler) prints none of the thread, process or caller fields: the logging
    # HOWTO's "Optimization" switches skip collecting them for every record (a frame walk and three lookups per
    # line; the host writes several lines per invocation). Same output.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # documented switch: no findCaller frame walk
    root.setLevel(level)
    # The storage SDK logs every request at INFO; that is noise (and URLs) for a developer host.
    logging.getLogger("azure").setLevel(max(level, logging.WARNING))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m local.host", description="Local Azure Functions host for this app")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: Host.LocalHttpPort or 7071)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--app-module", default="function_app", help="module holding the FunctionApp")
    p.add_argument("--script-root", type=Path, default=Path("."), help="folder with host.json and the app")
    p.add_argument("--settings", type=Path, default=None, help="local.settings.json (default: in the script root)")
    p.add_argument("--keys-file", type=Path, default=None,
                   help="keys used when local.settings.json has no Keys section "
                        "(default SCRIPT_ROOT/.local/host-keys.json)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight invocations get at shutdown")
    p.add_argument("--lease-seconds", type=int, default=None,
                   help="how long a running queue message stays invisible (default 600, the real host's); "
                        "tests that kill the host shorten it")
    p.add_argument("--verbose", "-v", action="store_true", help="DEBUG logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    script_root = args.script_root.resolve()
    settings_path = (args.settings or script_root / "local.settings.json").resolve()
    keys_file = (args.keys_file or script_root / ".local" / "host-keys.json").resolve()
    _setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        settings = load_local_settings(settings_path)
        if settings.path is None:
            log.warning("No %s: app settings come from the environment only", settings_path)
        skipped = apply_values(settings.values)
        for name in skipped:
            log.info("Skipping '%s' from local.settings.json as it's already defined in the environment", name)
        config = load_host_json(script_root)  # after the settings: AzureFunctionsJobHost__* app settings override it
        if not args.verbose:
            logging.getLogger().setLevel(config.log_level)
        keys = load_or_create_keys(settings.keys, keys_file)
    except (HostConfigError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if args.lease_seconds is not None:
        queues = dataclasses.replace(config.queues, lease_seconds=args.lease_seconds)
        config = dataclasses.replace(config, queues=queues)
    port = args.port or settings.local_http_port or 7071
    os.environ.setdefault("FUNCTIONS_WORKER_RUNTIME", "python")
    # The worker's working directory is the script root; relative paths in the app resolve there.
    os.chdir(script_root)
    try:
        app = find_app(load_app_module(args.app_module, script_root))
    except Exception as exc:
        # The real host indexes nothing when the import fails (azure-functions-python-worker#1338).
        log.error("Importing '%s' failed, no functions indexed", args.app_module, exc_info=exc)
        return 3
    result = index_app(app)
    host = FunctionsHost(
        HostOptions(script_root=script_root, port=port, bind=args.bind, grace=args.grace),
        config, keys, result.functions, result.errors,
    )
    try:
        code = asyncio.run(host.run())
    except PortInUseError as exc:
        log.error("%s", exc)
        code = 4
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without joining the sync-function threads: one still running after the grace period
    # must not keep the process alive (its message was already released).
    os._exit(code)


if __name__ == "__main__":
    main()
