"""The emulators' ceiling for the pipeline's minimal API work per email, driven directly by a bench client.

One unit = what the processor must do for one individual-mailbox email at the least: one Graph GET of the message
with the processor's own ``$select`` (``core.adapters.graph.MESSAGE_SELECT``), ``$expand=attachments`` and Prefer
header, then one Dataverse ``$batch`` with one change set shaped like the processor's write (``POST emails`` with
client-set id, deep-inserted parties and binds, then ``PATCH emails(id)`` to Received). Workers repeat units
back to back over keep-alive TLS connections for a bounded time.

httpx costs ~1.5 ms of client CPU per request (see bench/graph_emulator.py), which on 2 cores would cap the client
rather than the emulators, so requests are pre-built bytes over asyncio streams.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from core.adapters.graph import MESSAGE_SELECT


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    body = b""
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    elif length:
        body = await reader.readexactly(length)
    return status, body


def _batch_ok(status: int, body: bytes) -> bool:
    """A $batch answers 200 even when its change set failed: the inner responses carry the real status."""
    return status == 200 and b"HTTP/1.1 4" not in body and b"HTTP/1.1 5" not in body


def _email_row(owner_id: str, contact_id: str) -> tuple[str, dict[str, Any]]:
    aid = str(uuid.uuid4())
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return aid, {
        "activityid": aid, "subject": "ceiling", "description": "<p>Benchmark mail body.</p><p>Regards</p>",
        "directioncode": False, "messageid": f"<ceiling-{aid}@bench.example>", "actualend": now, "prioritycode": 1,
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_contact@odata.bind": f"/contacts({contact_id})",
             "addressused": "customer00@customer0.example"},
            {"participationtypemask": 2, "partyid_systemuser@odata.bind": f"/systemusers({owner_id})",
             "addressused": "ind00@contoso.example"}],
        # the names email.md declares (what the router binds on the documented org)
        "ownerid_email@odata.bind": f"/systemusers({owner_id})",
    }


def _batch_request(host: str, api_path: str, token: str, owner_id: str, contact_id: str) -> bytes:
    aid, row = _email_row(owner_id, contact_id)
    cs, b = f"changeset_{uuid.uuid4().hex}", f"batch_{uuid.uuid4().hex}"
    parts = [
        (1, "POST", f"{api_path}/emails", json.dumps(row)),
        (2, "PATCH", f"{api_path}/emails({aid})", json.dumps({"statecode": 1, "statuscode": 4})),
    ]
    body = f"--{b}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n" + "".join(
        f"--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {n}\r\n\r\n"
        f"{method} {url} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{payload}\r\n"
        for n, method, url, payload in parts) + f"--{cs}--\r\n--{b}--\r\n"
    data = body.encode()
    return (f"POST {api_path}/$batch HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: application/json\r\nOData-MaxVersion: 4.0\r\nOData-Version: 4.0\r\n"
            f"Content-Type: multipart/mixed; boundary={b}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


async def _drive(graph_url: str, graph_token: str, targets: list[tuple[str, str]], api_url: str, dv_token: str,
                 owner_id: str, contact_id: str, ctx: ssl.SSLContext, concurrency: int, seconds: float
                 ) -> dict[str, Any]:
    g, d = urlsplit(graph_url), urlsplit(api_url)
    g_host, d_host = f"{g.hostname}:{g.port}", f"{d.hostname}:{d.port}"
    select = ",".join(MESSAGE_SELECT)
    gets = [(f"GET /v1.0/users/{quote(mbx)}/messages/{quote(mid, safe='')}?$select={select}&$expand=attachments "
             f"HTTP/1.1\r\nHost: {g_host}\r\nAuthorization: Bearer {graph_token}\r\nAccept: application/json\r\n"
             'Prefer: IdType="ImmutableId", outlook.body-content-type="html"\r\n\r\n').encode()
            for mbx, mid in targets]
    done = errors = 0
    started = asyncio.Event()
    stop_at = 0.0

    failures: Counter[str] = Counter()

    async def unit(k: int, greader: asyncio.StreamReader, gwriter: asyncio.StreamWriter,
                   dreader: asyncio.StreamReader, dwriter: asyncio.StreamWriter) -> bool:
        gwriter.write(gets[k % len(gets)])
        status, _ = await _read_response(greader)
        if status != 200:
            failures[f"graph {status}"] += 1
            return False
        dwriter.write(_batch_request(d_host, d.path, dv_token, owner_id, contact_id))
        status, body = await _read_response(dreader)
        if not _batch_ok(status, body):
            bad = re.search(rb"HTTP/1\.1 ([45]\d\d)", body)
            inner = bad.group(1).decode() if bad else ""
            failures[f"dataverse {status}/{inner}"] += 1
            return False
        return True

    async def worker(w: int) -> None:
        nonlocal done, errors
        greader, gwriter = await asyncio.open_connection(g.hostname, g.port, ssl=ctx)
        dreader, dwriter = await asyncio.open_connection(d.hostname, d.port, ssl=ctx)
        try:
            await unit(w, greader, gwriter, dreader, dwriter)  # warm: TLS handshakes are not what we measure
            await started.wait()
            k = w
            while time.monotonic() < stop_at:
                k += concurrency
                if await unit(k, greader, gwriter, dreader, dwriter):
                    done += 1
                else:
                    errors += 1
        finally:
            gwriter.close()
            dwriter.close()

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    stop_at = t0 + seconds
    started.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 60)
    elapsed = time.monotonic() - t0
    return {"units": done, "errors": errors, "failures": dict(failures), "seconds": round(elapsed, 2),
            "concurrency": concurrency, "units_per_s": round(done / elapsed, 1) if elapsed else 0.0}


def measure_ceiling(*, graph_url: str, graph_token: str, targets: list[tuple[str, str]], api_url: str,
                    dv_token: str, owner_id: str, contact_id: str, ctx: ssl.SSLContext, concurrency: int = 16,
                    seconds: float = 8.0) -> dict[str, Any]:
    """``targets``: (mailbox address, Graph message id) pairs of real messages to GET."""
    return asyncio.run(_drive(graph_url, graph_token, targets, api_url, dv_token, owner_id, contact_id, ctx,
                              concurrency, seconds))
