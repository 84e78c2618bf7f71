"""Figures that need the whole pipeline running end to end (SMTP -> CRM latency at 50 msg/s, calls per tracked
email, ceiling ratio, 10,000-mailbox reconcile).

No placeholders: this module only decides, from what exists in the tree, whether they can be measured, and says
why not. The end-to-end load driver itself is not part of this version of the harness (see docs/proof.md), so
these rows are "not measured" with the reason, never a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.metrics import Metric, not_measured

ROOT = Path(__file__).resolve().parents[1]

_INDEX_PROBE = """
import json, function_app
rows = []
for f in function_app.app.get_functions():
    for b in json.loads(f.get_function_json())["bindings"]:
        rows.append([f.get_function_name(), b.get("type"), b.get("queueName") or b.get("route") or ""])
print(json.dumps(rows))
"""


def _indexed_bindings() -> list[list[str]]:
    try:
        done = subprocess.run([sys.executable, "-c", _INDEX_PROBE], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (subprocess.SubprocessError, ValueError, IndexError):
        return []


def pipeline_gaps() -> list[str]:
    """What is missing for an end-to-end run, in words (empty when everything is there)."""
    gaps: list[str] = []
    for path in ("core/services/inbound.py", "core/services/subscriptions.py", "local/stack.py"):
        if not (ROOT / path).exists():
            gaps.append(f"{path} missing")
    bindings = _indexed_bindings()
    if not any(kind == "queueTrigger" and "inbound" in target for _, kind, target in bindings):
        gaps.append("function_app registers no inbound queue trigger")
    if not any(kind == "timerTrigger" and "subscription" in name for name, kind, _ in bindings):
        gaps.append("function_app registers no subscription reconcile timer")
    return gaps


def measure() -> list[Metric]:
    gaps = pipeline_gaps()
    if gaps:
        reason = "pipeline not available: " + "; ".join(gaps)
    else:
        reason = ("pipeline present, but this harness has no end-to-end load driver yet "
                  "(SMTP load + CRM row polling); see docs/proof.md")
    return [
        not_measured("SMTP -> CRM latency at 50 msg/s: p50", "s", 1.0, reason),
        not_measured("SMTP -> CRM latency at 50 msg/s: p99", "s", 3.0, reason),
        not_measured("Dataverse calls per tracked email", "calls", 1.5, reason),
        not_measured("Graph calls per tracked email", "calls", 1.2, reason),
        not_measured("pipeline throughput / emulator ceiling", "ratio", 0.7, reason, ">="),
        not_measured("subscription reconcile, 10,000 mailboxes", "s", 60, reason),
    ]
