"""The bare-call client: the same minimal Graph and Dataverse calls the processor makes for one tracked email,
made by a plain Python client with nothing around them. Two figures come from it, in the same run as the pipeline:

* **CPU per unit** (``cpu_ms_per_unit``): this process's CPU time / units, the denominator of the router's CPU
  ratio ("router CPU per tracked email", docs/proof.md);
* **bare-call ceiling** (``units_per_s``): units per second at saturation, the denominator of the sustainable rate.

One unit = one Graph GET of a real message with the processor's own ``$select``/``$expand``
(``core.adapters.graph.GraphMailClient.get_message``'s query) and Prefer header, then one Dataverse ``$batch``
with one change set shaped like the processor's write (``POST emails`` with a client-set id, deep-inserted
parties and binds, then ``PATCH emails(id)`` to Received). The client is ``httpx.AsyncClient`` (the HTTP library
the router's adapters use) over keep-alive TLS, ``concurrency`` workers back to back for ``seconds``; a unit
counts only if the GET answered 200 and every inner response of the batch succeeded.

It runs in its own process (``python -m bench.bare_client SPEC.json``) so that its CPU time is its own; it prints
one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import ssl
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from core.adapters.graph import ATTACHMENT_METADATA, MESSAGE_EXTENDED_PROPERTIES, MESSAGE_SELECT

__all__ = ["batch_body", "message_query", "run"]


def message_query() -> str:
    """The processor's GET query (GraphMailClient.get_message)."""
    wanted = " or ".join(f"id eq '{p}'" for p in MESSAGE_EXTENDED_PROPERTIES)
    expand = [f"attachments($select={','.join(ATTACHMENT_METADATA)})",
              f"singleValueExtendedProperties($filter={wanted})"]
    return "$select=" + ",".join(MESSAGE_SELECT) + "&$expand=" + quote(",".join(expand), safe="$=,'()")


def _email_row(owner_id: str, contact_id: str) -> tuple[str, dict[str, Any]]:
    aid = str(uuid.uuid4())
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return aid, {
        "activityid": aid, "subject": "bare call", "description": "<p>Benchmark mail body.</p><p>Regards</p>",
        "directioncode": False, "messageid": f"<bare-{aid}@bench.example>", "actualend": now, "prioritycode": 1,
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_contact@odata.bind": f"/contacts({contact_id})",
             "addressused": "customer00@customer0.example"},
            {"participationtypemask": 2, "partyid_systemuser@odata.bind": f"/systemusers({owner_id})",
             "addressused": "ind00@contoso.example"}],
        "ownerid_email@odata.bind": f"/systemusers({owner_id})",
    }


def batch_body(api_path: str, owner_id: str, contact_id: str) -> tuple[str, bytes]:
    """(content type, body) of one processor-shaped ``$batch``: POST email + PATCH to Received in one change set."""
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
    return f"multipart/mixed; boundary={b}", body.encode()


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx

    ctx = ssl.create_default_context(cafile=spec["ca_bundle"])
    targets: list[tuple[str, str]] = [tuple(t) for t in spec["targets"]]  # type: ignore[misc]
    api_url: str = spec["api_url"].rstrip("/")
    api_path = "/" + api_url.split("://", 1)[1].split("/", 1)[1]
    concurrency, seconds = int(spec.get("concurrency", 16)), float(spec.get("seconds", 8.0))
    graph = httpx.AsyncClient(base_url=spec["graph_base_url"], verify=ctx, timeout=60,
                              limits=httpx.Limits(max_connections=concurrency),
                              headers={"Authorization": f"Bearer {spec['graph_token']}", "Accept": "application/json"})
    dv = httpx.AsyncClient(verify=ctx, timeout=60, limits=httpx.Limits(max_connections=concurrency),
                           headers={"Authorization": f"Bearer {spec['dv_token']}", "Accept": "application/json",
                                    "OData-MaxVersion": "4.0", "OData-Version": "4.0"})
    query = message_query()
    prefer = {"Prefer": 'IdType="ImmutableId", outlook.body-content-type="html"'}
    failures: Counter[str] = Counter()
    done = 0
    stop_at = 0.0
    started = asyncio.Event()

    async def unit(k: int) -> bool:
        mailbox, message_id = targets[k % len(targets)]
        r = await graph.get(f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}?{query}", headers=prefer)
        if r.status_code != 200:
            failures[f"graph {r.status_code}"] += 1
            return False
        r.json()
        content_type, body = batch_body(api_path, spec["owner_id"], spec["contact_id"])
        r = await dv.post(f"{api_url}/$batch", content=body, headers={"Content-Type": content_type,
                                                                      "If-None-Match": "null"})
        if r.status_code != 200 or b"HTTP/1.1 4" in r.content or b"HTTP/1.1 5" in r.content:
            inner = re.search(rb"HTTP/1\.1 ([45]\d\d)", r.content)
            failures[f"dataverse {r.status_code}/{inner.group(1).decode() if inner else ''}"] += 1
            return False
        return True

    async def worker(w: int) -> None:
        nonlocal done
        await unit(w)  # warm: connections and TLS handshakes are not what is measured
        await started.wait()
        k = w
        while time.monotonic() < stop_at:
            k += concurrency
            if await unit(k):
                done += 1

    try:
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        await asyncio.sleep(1.0)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        stop_at = t0 + seconds
        started.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 120)
        elapsed = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await graph.aclose()
        await dv.aclose()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"units": done, "errors": sum(failures.values()), "failures": dict(failures),
            "seconds": round(elapsed, 2), "concurrency": concurrency,
            "units_per_s": round(done / elapsed, 1) if elapsed else 0.0, "cpu_s": round(cpu, 3),
            "cpu_ms_per_unit": round(cpu * 1000 / done, 3) if done else None,
            "client": "httpx.AsyncClient (keep-alive TLS), one process"}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_drive(spec))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    print(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
