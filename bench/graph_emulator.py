"""Throughput of the Graph emulator: authenticated simple GETs/s and SMTP deliveries/s (a script, not a test).

The emulator runs in its own process (``python -m emulators.graph``), as in the stack, so the load
generator does not share its interpreter. The identity emulator runs in-thread here: it is only asked
for one token and the JWKS. Loads are bounded by count and by a wall-clock cap.

    .venv/bin/python -m bench.graph_emulator [--gets 5000] [--concurrency 16] [--mails 300] [--out FILE]

Prints one JSON object (targets: >= 1,000 GETs/s and >= 100 SMTP deliveries/s on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import msal
import psutil

from emulators.common import demo
from emulators.common.server import free_port
from emulators.common.tls import ensure_tls
from emulators.identity.testing import start_identity

ALICE = f"alice@{demo.TENANT_DOMAIN}"
GET_TARGET = 1000.0
SMTP_TARGET = 100.0


def _token(identity_url: str) -> str:
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, authority=f"{identity_url}/{demo.TENANT_ID}",
                                             client_credential=demo.APP_CLIENT_SECRET, instance_discovery=False)
    result = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
    if "access_token" not in result:
        raise SystemExit(f"no token: {result.get('error_description')}")
    return str(result["access_token"])


def _wait_healthy(url: str, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes], deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"graph emulator exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/_emulator/health", verify=ctx, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("graph emulator did not become healthy")


async def _gets(base: str, token: str, ctx: ssl.SSLContext, total: int, concurrency: int, cap_s: float
                ) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 GETs over TLS with a minimal raw client.

    httpx costs ~1.5 ms of client CPU per request, so on 2 cores it, not the emulator, would be measured;
    a pre-built request and a Content-Length read keep the load generator cheap.
    """
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    async with httpx.AsyncClient(base_url=base, verify=ctx, headers={"Authorization": f"Bearer {token}"}) as client:
        first = (await client.get(f"/users/{ALICE}/mailFolders/inbox/messages", params={"$top": "1"})).json()
    message_id = first["value"][0]["id"]
    path = f"{parts.path}/users/{quote(ALICE)}/messages/{quote(message_id, safe='')}?$select=id,subject"
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    done = 0
    errors = 0
    stop_at = time.monotonic() + cap_s

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return status

    async def worker(warm: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            for _ in range(warm):
                await one(reader, writer)
            await ready.wait()
            while done + errors < total and time.monotonic() < stop_at:
                if await one(reader, writer) == 200:
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    ready = asyncio.Event()
    workers = [asyncio.create_task(worker(5)) for _ in range(concurrency)]
    await asyncio.sleep(0.5)  # connections open and warm (TLS handshakes are not what we measure)
    started = time.perf_counter()
    ready.set()
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - started
    return {"requests": done, "errors": errors, "seconds": round(elapsed, 3),
            "per_second": round(done / elapsed, 1) if elapsed else 0.0, "concurrency": concurrency}


def _smtp(host: str, port: int, base: str, token: str, ctx: ssl.SSLContext, total: int, senders: int,
          cap_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}

    def inbox_count(client: httpx.Client) -> int:
        return int(client.get(f"/users/{ALICE}/mailFolders/inbox", headers=headers).json()["totalItemCount"])

    with httpx.Client(base_url=base, verify=ctx, timeout=30) as client:
        before = inbox_count(client)
        per_sender = max(1, total // senders)
        sent = [0] * senders
        stop_at = time.monotonic() + cap_s

        def sender(n: int) -> None:
            with smtplib.SMTP(host, port, timeout=60) as smtp:
                for i in range(per_sender):
                    if time.monotonic() > stop_at:
                        return
                    msg = EmailMessage()
                    msg["From"] = f"load{n}@example.org"
                    msg["To"] = ALICE
                    msg["Subject"] = f"bench {n}-{i}"
                    msg["Message-ID"] = f"<bench-{n}-{i}-{time.time_ns()}@example.org>"
                    msg.set_content("benchmark body " * 20)
                    msg.add_alternative("<p>" + "benchmark body " * 20 + "</p>", subtype="html")
                    smtp.send_message(msg)
                    sent[n] += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(cap_s + 60)
        # accepted by SMTP is not yet stored: wait (bounded) until the mailbox holds them all
        expected = before + sum(sent)
        while inbox_count(client) < expected and time.monotonic() < stop_at + 30:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        delivered = inbox_count(client) - before
    return {"sent": sum(sent), "delivered": delivered, "seconds": round(elapsed, 3),
            "per_second": round(delivered / elapsed, 1) if elapsed else 0.0, "connections": senders}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gets", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mails", type=int, default=300)
    parser.add_argument("--smtp-connections", type=int, default=4)
    parser.add_argument("--cap-s", type=float, default=60.0, help="wall-clock cap per phase")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="graph-bench-") as tmp:
        tls_dir = Path(tmp) / "tls"
        tls = ensure_tls(tls_dir)
        os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(tls.bundle)
        ctx = ssl.create_default_context(cafile=str(tls.bundle))
        identity = start_identity(tls_dir)
        port, smtp_port = free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulators.graph", "--port", str(port), "--smtp-port", str(smtp_port),
             "--tls-dir", str(tls_dir), "--identity-url", identity.url, "--in-memory", "--log-level", "WARNING"],
            env={**os.environ})
        try:
            url = f"https://127.0.0.1:{port}"
            _wait_healthy(url, ctx, proc)
            token = _token(identity.url)
            seed_mail = EmailMessage()
            seed_mail["From"] = "seed@example.org"
            seed_mail["To"] = ALICE
            seed_mail["Subject"] = "bench seed"
            seed_mail.set_content("seed")
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                smtp.send_message(seed_mail)
            time.sleep(0.2)
            server = psutil.Process(proc.pid)
            cpu_before = sum(server.cpu_times()[:2])
            gets = asyncio.run(_gets(f"{url}/v1.0", token, ctx, args.gets, args.concurrency, args.cap_s))
            cpu = sum(server.cpu_times()[:2]) - cpu_before
            # the emulator's own ceiling: requests per CPU-second it spent (the load generator shares the host)
            gets["server_cpu_seconds"] = round(cpu, 3)
            gets["per_server_cpu_second"] = round(gets["requests"] / cpu, 1) if cpu > 0 else None
            smtp_result = _smtp("127.0.0.1", smtp_port, f"{url}/v1.0", token, ctx, args.mails,
                                args.smtp_connections, args.cap_s)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            identity.stop()
    result = {"benchmark": "graph_emulator", "cpus": os.cpu_count(), "gets": gets, "smtp": smtp_result,
              "targets": {"gets_per_second": GET_TARGET, "smtp_deliveries_per_second": SMTP_TARGET},
              "met": {"gets": gets["per_second"] >= GET_TARGET, "smtp": smtp_result["per_second"] >= SMTP_TARGET}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
