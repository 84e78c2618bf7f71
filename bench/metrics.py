"""One benchmark figure beside its DESIGN.md §5 target, and the JSON/table rendering of a run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "miss", "info", "not measured", "error"]

__all__ = ["Metric", "Status", "not_measured", "percentile", "summarise_ms"]


@dataclass
class Metric:
    name: str
    measured: float | None
    unit: str
    target: float | None = None  # None: reported, no target in DESIGN.md §5
    target_op: Literal["<=", ">=", "=="] = "<="
    detail: str = ""
    status: Status = "info"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status in ("not measured", "error"):
            self.measured = None  # never a number for a figure that was not measured
            return
        if self.measured is None or self.target is None:
            self.status = "info"
            return
        ok = {"<=": self.measured <= self.target, ">=": self.measured >= self.target,
              "==": self.measured == self.target}[self.target_op]
        self.status = "pass" if ok else "miss"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{self.target_op} {_fmt(self.target)} {self.unit}".strip()

    @property
    def measured_text(self) -> str:
        if self.measured is None:
            return self.status
        return f"{_fmt(self.measured)} {self.unit}".strip()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_text"] = self.target_text
        return data


def not_measured(name: str, unit: str, target: float | None, reason: str, target_op: Literal["<=", ">=", "=="] = "<=",
                 *, error: bool = False) -> Metric:
    return Metric(name, None, unit, target, target_op, detail=reason, status="error" if error else "not measured")


def _fmt(value: float) -> str:
    if value == 0 or math.isnan(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise_ms(samples_s: Sequence[float]) -> dict[str, float]:
    if not samples_s:
        return {}
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "max": max(ms), "mean": statistics.fmean(ms)}
