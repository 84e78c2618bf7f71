"""CPU accounting for the pipeline benchmark: per-process CPU time (psutil) and, with py-spy, the part of the
Functions host's CPU spent in storage calls.

Storage share: ``py-spy record --gil --nonblocking`` samples the host's Python stacks 100 times a second, only
while a thread holds the GIL (so waiting threads and I/O do not count, CPU spent in Python does); a sample is a
*storage* sample when its stack is inside the Azure Storage SDKs (``azure/storage``, ``azure/data/tables``), our
storage adapter (``core/adapters/storage.py``) or the local host's queue listener (``local/host/queues.py``, the
part the real Functions host does in .NET). Storage CPU = host CPU x storage samples / all samples. py-spy is a
dev dependency; where it cannot attach (no ptrace permission), the split is reported as not measured.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["STORAGE_MARKERS", "ProcessCpu", "StorageSampler"]

STORAGE_MARKERS = ("azure/storage/", "azure/data/tables/", "core/adapters/storage.py", "local/host/queues.py")
OUR_STORAGE_MARKERS = ("core/adapters/storage.py", "local/host/queues.py")


class ProcessCpu:
    """CPU seconds (user + system) of named processes, read now."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        import psutil

        self._procs = {}
        for name, pid in pids.items():
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.Error:
                continue

    def snapshot(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, proc in self._procs.items():
            try:
                times = proc.cpu_times()
                children = sum(c.cpu_times().user + c.cpu_times().system for c in proc.children(recursive=True))
                out[name] = times.user + times.system + children
            except psutil.Error:
                continue
        return out

    @staticmethod
    def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 3) for k in after if k in before}


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


class StorageSampler:
    """``py-spy record`` on one process for a bounded time; ``result()`` classifies the samples."""

    def __init__(self, pid: int, seconds: float, rate: int = 100) -> None:
        self.pid = pid
        self.seconds = seconds
        self._dir = tempfile.TemporaryDirectory(prefix="bench-pyspy-")
        self._out = Path(self._dir.name) / "stacks.txt"
        self._proc: subprocess.Popen[bytes] | None = None
        self.error = ""
        binary = _py_spy()
        if binary is None:
            self.error = "py-spy is not installed (requirements-dev.txt)"
            return
        try:
            self._proc = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate),
                 "--gil", "--nonblocking", "--format", "raw", "--full-filenames", "--output", str(self._out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            self.error = f"py-spy did not start: {exc}"

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            if self._proc is None:
                return {"error": self.error}
            try:
                _, err = self._proc.communicate(timeout=self.seconds + timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                return {"error": "py-spy did not finish"}
            if not self._out.exists():
                return {"error": f"py-spy wrote nothing ({(err or b'').decode(errors='replace').strip()[:200]})"}
            return classify(self._out.read_text(errors="replace"))
        finally:
            self._dir.cleanup()


def classify(raw: str) -> dict[str, Any]:
    """py-spy's raw format: one ``frame;frame;...;frame count`` line per distinct stack. Recorded with
    ``--full-filenames``: by default py-spy shortens a path to its package part, and the Azure SDKs live in namespace
    packages, so ``azure/storage/queue/...`` printed as ``queue/...`` and ``azure/data/tables/...`` as ``tables/...``
    - the markers never matched, and the SDKs' own CPU was counted as the router's."""
    total = storage = ours = 0
    by_part: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        marker = next((m for m in STORAGE_MARKERS if m in stack), None)
        if marker is not None:
            storage += count
            by_part[marker] += count
            ours += count if any(m in stack for m in OUR_STORAGE_MARKERS) else 0
    if not total:
        return {"error": "py-spy recorded no sample"}
    # ``ours_only``: what the classification found before the SDK frames were recognised (our adapter and the
    # local host's listener only), kept so figures from before and after the fix can be compared.
    return {"samples": total, "storage_samples": storage, "storage_fraction": round(storage / total, 4),
            "storage_by_part": dict(by_part), "storage_fraction_ours_only": round(ours / total, 4)}
