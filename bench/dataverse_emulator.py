"""Benchmark the Dataverse emulator: email creates/s (with 3 deep-inserted parties) and batched creates/s.

Runs the emulator as a separate process (so client and server do not share a GIL), the identity emulator in-process
for the one token it needs, then prints a JSON result (and writes it with --out).

    python bench/dataverse_emulator.py [--creates 2000] [--threads 8] [--batches 20] [--batch-size 100] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulators.common import demo  # noqa: E402
from emulators.common.server import free_port  # noqa: E402
from emulators.common.tls import client_env, ensure_tls  # noqa: E402
from emulators.dataverse.seed import demo_user_id  # noqa: E402
from emulators.identity.testing import start_identity  # noqa: E402

FIONA = "c0ffee00-0000-4000-8000-00000000c001"


def _email() -> dict[str, Any]:
    return {"activityid": str(uuid.uuid4()), "subject": "bench", "description": "<p>x</p>", "directioncode": False,
            "messageid": f"<{uuid.uuid4()}@bench>",
            "email_activity_parties": [
                {"participationtypemask": 1, "partyid_contact@odata.bind": f"/contacts({FIONA})"},
                {"participationtypemask": 2, "partyid_systemuser@odata.bind": f"/systemusers({demo_user_id('alice')})"},
                {"participationtypemask": 3, "addressused": "someone@external.example"}]}


def _wait_healthy(url: str, ctx: ssl.SSLContext, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/_emulator/health", verify=ctx, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the Dataverse emulator did not become healthy")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--creates", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dv-bench-"))
    tls = ensure_tls(tmp / "tls")
    os.environ.update(client_env(tls))
    ctx = ssl.create_default_context(cafile=str(tls.bundle))
    identity = start_identity(tmp / "tls")
    port = free_port()
    org = f"https://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulators.dataverse", "--port", str(port), "--tls-dir", str(tmp / "tls"),
         "--identity-url", identity.url, "--in-memory"], cwd=ROOT, env={**os.environ})
    try:
        _wait_healthy(org, ctx)
        app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
                                                 authority=f"{identity.url}/{demo.TENANT_ID}",
                                                 instance_discovery=False)
        token = app.acquire_token_for_client(scopes=[f"{org}/.default"])["access_token"]
        headers = {"Authorization": f"Bearer {token}", "OData-Version": "4.0", "Accept": "application/json"}
        api = f"{org}/api/data/v9.2"

        per_thread = args.creates // args.threads
        errors: list[int] = []

        def worker() -> None:
            with httpx.Client(verify=ctx, headers=headers, timeout=60) as c:
                for _ in range(per_thread):
                    r = c.post(f"{api}/emails", json=_email())
                    if r.status_code != 204:
                        errors.append(r.status_code)

        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        single_s = time.perf_counter() - t0
        created = per_thread * args.threads

        def batch_body(n: int) -> tuple[bytes, str]:
            cs = f"changeset_{uuid.uuid4()}"
            parts = [f"--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                     f"Content-ID: {i + 1}\r\n\r\nPOST /api/data/v9.2/emails HTTP/1.1\r\n"
                     f"Content-Type: application/json; type=entry\r\n\r\n{json.dumps(_email())}\r\n" for i in range(n)]
            b = f"batch_{uuid.uuid4()}"
            body = f"--{b}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n" + "".join(parts) + \
                f"--{cs}--\r\n--{b}--\r\n"
            return body.encode(), b

        t1 = time.perf_counter()
        with httpx.Client(verify=ctx, headers=headers, timeout=120) as c:
            for _ in range(args.batches):
                body, b = batch_body(args.batch_size)
                r = c.post(f"{api}/$batch", content=body, headers={"Content-Type": f"multipart/mixed; boundary={b}"})
                if r.status_code != 200:
                    errors.append(r.status_code)
        batch_s = time.perf_counter() - t1
        result = {
            "creates": created, "threads": args.threads, "creates_per_s": round(created / single_s, 1),
            "batched_creates": args.batches * args.batch_size, "batch_size": args.batch_size,
            "batched_creates_per_s": round(args.batches * args.batch_size / batch_s, 1),
            "errors": len(errors), "cpu_count": os.cpu_count(),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        identity.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
