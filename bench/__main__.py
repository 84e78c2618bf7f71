"""``python -m bench`` (= ``make bench``): every figure of DESIGN.md §5 that can be measured on this machine now,
beside its target; writes bench/results/<timestamp>.json and bench/results/latest.json and prints a table.

    python -m bench [--quick] [--only cold,webhook,emulators,memory,pipeline] [--out-dir bench/results]

Bounded: each section has its own count/time limits; the default run takes about 13-15 minutes on 2 cores (the
pipeline section: 60 s of steady load, the bare-client ceiling, stepped rates, two 90 s budget phases and the
10,000-mailbox reconcile, each capped) and ``--quick`` about 5 minutes. See docs/proof.md for how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.metrics import Metric, not_measured

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("cold", "webhook", "emulators", "memory", "pipeline")


MEMORY_ROW = "memory per large attachment (25 MB, processor path)"


def _memory(quick: bool) -> list[Metric]:
    """Issue 17: peak RSS above baseline for one 25 MB attachment through the real inbound processor (a fresh
    process; Graph and Dataverse answered in it by streaming transports that keep no bodies)."""
    done = subprocess.run([sys.executable, "-m", "bench.memory_probe", "--mb", "25"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        return [not_measured(MEMORY_ROW, "MiB", 60, (done.stderr.strip() or f"exit {done.returncode}")[-300:],
                             error=True)]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return [Metric(MEMORY_ROW, data["peak_over_baseline_mib"], "MiB", 60, "<=",
                   detail=f"{data['peak_over_attachment']}x the attachment; peak {data['peak_rss_mib']} over "
                          f"{data['baseline_rss_mib']} MiB (imports + 5 MiB warm-up); "
                          f"{data['attachment_bytes_written_to_dataverse']:,} bytes reached Dataverse intact (SHA-256)",
                   extra=data)]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return ""


def run(sections: tuple[str, ...], quick: bool) -> dict[str, Any]:
    from bench import cold_start, emulator_ceilings, pipeline, webhook_ack

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    metrics: list[Metric] = []
    raw: dict[str, Any] = {}
    plan: dict[str, Callable[[], list[Metric]]] = {
        "cold": lambda: cold_start.measure(runs=5 if quick else 7),
        "webhook": lambda: webhook_ack.measure(rate=500, duration=2 if quick else 5),
        "memory": lambda: _memory(quick),
        "pipeline": lambda: pipeline.measure(quick=quick),
    }
    for section in SECTIONS:
        if section not in sections:
            continue
        print(f"[bench] {section} ...", file=sys.stderr, flush=True)
        section_t0 = time.perf_counter()
        try:
            if section == "emulators":
                found, raw_emulators = emulator_ceilings.measure(quick=quick)
                metrics.extend(found)
                raw.update(raw_emulators)
            else:
                metrics.extend(plan[section]())
        except Exception as exc:  # a broken section is reported, never turned into a number
            traceback.print_exc()
            metrics.append(not_measured(f"{section}: harness error", "", None,
                                        f"{type(exc).__name__}: {str(exc)[:200]}", error=True))
        print(f"[bench] {section} done in {time.perf_counter() - section_t0:.1f} s", file=sys.stderr, flush=True)
    return {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "commit": _git_commit()},
        "metrics": [m.to_json() for m in metrics],
        "emulators": raw,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"pass": "green", "miss": "red", "info": "cyan", "not measured": "yellow", "error": "magenta"}
    table = Table(title=f"Email Router benchmark ({'quick' if result['quick'] else 'full'}, "
                        f"{result['machine']['cpus']} CPUs, {result['duration_s']} s)", show_lines=False)
    for col in ("metric", "measured", "target", "pass/miss", "detail"):
        table.add_column(col, overflow="fold")
    for m in result["metrics"]:
        measured = "-" if m["measured"] is None else f"{m['measured']:g} {m['unit']}".strip()
        table.add_row(m["name"], measured, m["target_text"], f"[{colour[m['status']]}]{m['status']}[/]",
                      m["detail"][:160])
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter loads (about one minute)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    result = run(sections, args.quick)
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = result["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
        text = json.dumps(result, indent=2) + "\n"
        (args.out_dir / f"{stamp}.json").write_text(text)
        (args.out_dir / "latest.json").write_text(text)
        print(f"[bench] wrote {args.out_dir / (stamp + '.json')} and latest.json", file=sys.stderr)
    print_table(result)
    return 1 if any(m["status"] == "error" for m in result["metrics"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
