"""Cold start: ``import function_app`` in a fresh interpreter, median of several runs (target <= 1.5 s)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.metrics import Metric

ROOT = Path(__file__).resolve().parents[1]
_PROBE = ("import json, time; t = time.perf_counter(); import function_app; "
          "print(json.dumps({'import_s': time.perf_counter() - t}))")


def measure(runs: int = 7, timeout: float = 60.0) -> list[Metric]:
    imports: list[float] = []
    walls: list[float] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "frozen_modules=on", "-c", _PROBE], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, check=True)
        walls.append(time.perf_counter() - start)
        imports.append(float(json.loads(done.stdout.strip().splitlines()[-1])["import_s"]))
    median_import = statistics.median(imports)
    median_wall = statistics.median(walls)
    return [
        Metric("cold start: import function_app (median)", round(median_import, 3), "s", 1.5,
               detail=f"{runs} fresh interpreters; min {min(imports):.3f} s, max {max(imports):.3f} s",
               extra={"runs_s": [round(x, 4) for x in imports]}),
        Metric("cold start: whole interpreter incl. import (median)", round(median_wall, 3), "s", None,
               detail="python start-up + import + exit, for context",
               extra={"runs_s": [round(x, 4) for x in walls]}),
    ]
