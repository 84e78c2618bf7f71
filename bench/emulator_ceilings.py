"""The emulators' own benchmarks (bench/graph_emulator.py, bench/dataverse_emulator.py, written by their owners),
run as bounded subprocesses; their JSON is kept verbatim in the result and summarised as figures."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.metrics import Metric, not_measured

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, args: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    if not (ROOT / "bench" / f"{module}.py").exists():
        return None, f"bench/{module}.py not present"
    with tempfile.TemporaryDirectory(prefix=f"bench-{module}-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--out", str(out)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None, f"bench/{module}.py did not finish within {timeout:.0f} s"
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"bench/{module}.py exited {done.returncode} without a result: {' | '.join(tail)}"
        return json.loads(out.read_text()), ""


def measure(*, quick: bool = False) -> tuple[list[Metric], dict[str, Any]]:
    metrics: list[Metric] = []
    raw: dict[str, Any] = {}
    graph_args = ["--gets", "1000", "--mails", "50", "--cap-s", "20"] if quick else \
        ["--gets", "5000", "--mails", "300", "--cap-s", "45"]
    graph, why = _run("graph_emulator", graph_args, 90 if quick else 150)
    raw["graph_emulator"] = graph if graph is not None else {"not_measured": why}
    if graph is None:
        metrics.append(not_measured("Graph emulator ceiling: GET /messages/{id}", "req/s", 1000, why, ">="))
    else:
        gets = _first(graph.get("gets", {}), ("per_second",))
        mails = _first(graph.get("smtp", {}), ("per_second",))
        metrics.append(Metric("Graph emulator ceiling: authenticated GETs", gets, "req/s", 1000, ">=",
                              detail="bench/graph_emulator.py (its own target)"))
        metrics.append(Metric("Graph emulator ceiling: SMTP deliveries", mails, "msg/s", 100, ">=",
                              detail="bench/graph_emulator.py (its own target)"))
    dv_args = ["--creates", "400", "--threads", "4", "--batches", "4"] if quick else \
        ["--creates", "2000", "--threads", "8", "--batches", "20"]
    dataverse, why = _run("dataverse_emulator", dv_args, 90 if quick else 150)
    raw["dataverse_emulator"] = dataverse if dataverse is not None else {"not_measured": why}
    if dataverse is None:
        metrics.append(not_measured("Dataverse emulator ceiling: email creates", "rows/s", None, why))
    else:
        metrics.append(Metric("Dataverse emulator ceiling: email creates (3 parties)",
                              _first(dataverse, ("creates_per_s",)), "rows/s", None,
                              detail=f"{dataverse.get('threads')} client threads; errors {dataverse.get('errors')}"))
        metrics.append(Metric("Dataverse emulator ceiling: batched creates",
                              _first(dataverse, ("batched_creates_per_s",)), "rows/s", None,
                              detail=f"$batch of {dataverse.get('batch_size')}"))
    return metrics, raw


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` found anywhere in the (possibly nested) result."""
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in keys:
                if isinstance(node.get(key), int | float):
                    return float(node[key])
            stack.extend(node.values())
    return None
