"""Scale figure: the subscription reconcile for N extra mailboxes, run as the product runs it from the CLI.

``seed_scale`` adds N Graph users (``/_emulator/seed``, in chunks) and N mailbox settings rows (cloned from a row
the CRM sync wrote for an individual mailbox, upserted with Azure Table transactions of 100). The reconcile then
runs in a fresh process (``python -m bench.pipeline_reconcile``) with the Functions host's own app settings:
``emailrouter --json subscriptions reconcile``; that process prints its wall time and peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import redirect_stdout
from typing import Any

from bench.pipeline_load import DOMAIN, object_id
from local.stack import ROOT, Stack, StackError

SCALE_PREFIX = "benchscale"


def seed_scale(stack: Stack, count: int, template_address: str, *, cap_s: float = 120.0) -> dict[str, Any]:
    """Graph users in the stack's Graph emulator; settings rows in separate tables (``TABLE_PREFIX`` =
    ``benchscale``) so the stack's own host never sees these mailboxes: its delta catch-up timer (every 5 minutes)
    would otherwise fan out to 10,000 mailboxes in the middle of the measurement."""
    from azure.data.tables import UpdateMode

    from core.adapters.storage import encode_key

    t0 = time.monotonic()
    addresses = [f"scale{i:05d}@{DOMAIN}" for i in range(count)]
    seeded = 0
    for start in range(0, count, 2000):
        if time.monotonic() - t0 > cap_s:
            break
        chunk = addresses[start:start + 2000]
        stack.emulator("graph", "POST", "seed", {"users": [
            {"id": object_id(a), "userPrincipalName": a, "displayName": a.split("@")[0], "mail": a} for a in chunk]},
            timeout=300)
        seeded += len(chunk)
    graph_s = time.monotonic() - t0
    template = dict(stack.table("Mailboxes").get_entity("mailbox", encode_key(template_address.lower())))
    table = stack.table("Mailboxes", prefix=SCALE_PREFIX)
    table.create_table()
    rows = 0
    t1 = time.monotonic()
    for start in range(0, seeded, 100):
        if time.monotonic() - t0 > cap_s:
            break
        ops = []
        for a in addresses[start:start + 100]:
            entity = {k: v for k, v in template.items() if not k.startswith(("odata", "Timestamp", "etag"))}
            entity.update({"PartitionKey": "mailbox", "RowKey": encode_key(a), "Address": a})
            for key in [k for k in entity if k.startswith("Crm") and k.endswith(("Id", "RecordId"))]:
                entity[key] = object_id(a)  # a distinct (fictitious) CRM id per mailbox
            ops.append(("upsert", entity, {"mode": UpdateMode.REPLACE}))
        table.submit_transaction(ops)
        rows += len(ops)
    return {"graph_users": seeded, "mailbox_rows": rows, "graph_seed_s": round(graph_s, 1),
            "rows_s": round(time.monotonic() - t1, 1)}


def run_reconcile(stack: Stack, overrides: dict[str, str], *, timeout: float) -> dict[str, Any]:
    """The reconcile subprocess with the host's app settings plus ``overrides``; returns its JSON (or
    ``{"error": ...}``) plus the outer wall time."""
    env = {**os.environ, **stack.app_settings(), **stack.client_env(), **overrides}
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "bench.pipeline_reconcile"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s", "outer_s": round(time.monotonic() - t0, 1)}
    outer = round(time.monotonic() - t0, 2)
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StackError(f"reconcile subprocess exited {done.returncode}: {' | '.join(tail)}") from None
    result["outer_s"] = outer
    return result


def _main() -> int:
    """In the subprocess: the CLI's reconcile, timed, with this process's peak RSS."""
    from core.cli import main as cli_main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        code = cli_main(["--json", "subscriptions", "reconcile"])
    wall = time.perf_counter() - t0
    report: Any = None
    try:
        report = json.loads(buf.getvalue())
    except ValueError:
        report = buf.getvalue()[-500:]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"exit": code, "wall_s": round(wall, 2), "peak_rss_mib": round(peak_kib / 1024, 1),
                      "report": report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
