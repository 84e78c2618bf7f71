"""Start and stop Azurite (npm package pinned in package.json) for the stack and for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite"

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Azurite:
    blob_port: int
    queue_port: int
    table_port: int
    process: subprocess.Popen[bytes]

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint=http://127.0.0.1:{self.table_port}/{ACCOUNT};"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def ensure_installed() -> Path:
    if not AZURITE_BIN.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is needed to install Azurite (see package.json)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)  # noqa: S603 - npm from PATH, fixed args
    return AZURITE_BIN


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Azurite exited with status {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"Azurite did not listen on port {port} within {timeout}s")


def start_azurite(
    *,
    location: Path | None = None,
    ports: tuple[int, int, int] | None = None,
    log: int | None = subprocess.DEVNULL,
    timeout: float = 30.0,
) -> Azurite:
    """Start Azurite on loopback. ``location=None`` keeps data in memory (tests)."""
    binary = ensure_installed()
    blob, queue, table = ports or (free_port(), free_port(), free_port())
    args = [
        str(binary),
        "--blobHost", "127.0.0.1", "--blobPort", str(blob),
        "--queueHost", "127.0.0.1", "--queuePort", str(queue),
        "--tableHost", "127.0.0.1", "--tablePort", str(table),
        "--skipApiVersionCheck", "--disableTelemetry", "--loose",
    ]
    if location is None:
        args.append("--inMemoryPersistence")
    else:
        location.mkdir(parents=True, exist_ok=True)
        args += ["--location", str(location)]
    proc = subprocess.Popen(  # noqa: S603 - fixed binary from our own node_modules
        args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True, env={**os.environ},
    )
    try:
        for port in (blob, queue, table):
            _wait_port(port, proc, timeout)
    except Exception:
        proc.kill()
        raise
    return Azurite(blob, queue, table, proc)


@contextlib.contextmanager
def running_azurite(**kwargs: object) -> Iterator[Azurite]:
    az = start_azurite(**kwargs)  # type: ignore[arg-type]
    try:
        yield az
    finally:
        az.stop()
