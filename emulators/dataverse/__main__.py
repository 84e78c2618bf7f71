"""``python -m emulators.dataverse --port P --tls-dir DIR --identity-url URL [--state-dir DIR | --in-memory]
[--seed FILE] [--strict | --lenient] [--variant FILE]``: serve the Dataverse Web API emulator over HTTPS until
Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emulators.common.server import serve
from emulators.common.tls import ensure_tls

from .app import DataverseConfig, create_app
from .service import Options, OrgVariant


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulators.dataverse", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--tls-dir", type=Path, required=True, help="local CA + server certificate directory")
    p.add_argument("--identity-url", required=True, help="identity emulator base URL (token issuer and JWKS)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, help="persist the SQLite database here")
    where.add_argument("--in-memory", action="store_true", help="keep state in memory (default without --state-dir)")
    p.add_argument("--seed", type=Path, help="seed JSON file (default: the demo organization)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="strict", action="store_true", default=True,
                      help="reject read-only columns in payloads (default)")
    mode.add_argument("--lenient", dest="strict", action="store_false", help="ignore read-only columns")
    p.add_argument("--duplicate-status", type=int, default=412, help="HTTP status of duplicate-key errors")
    p.add_argument("--variant", type=Path,
                   help='variant org JSON, e.g. {"concurrency_off":["email"],"nav_renames":[{"entity":"email",'
                        '"nav":"ReceivingMailboxId_Email","to":""}]} (docs/dataverse-emulator.md)')
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tls = ensure_tls(args.tls_dir)
    seed = json.loads(args.seed.read_text()) if args.seed else None
    state_path = ":memory:" if args.in_memory or not args.state_dir else str(args.state_dir / "dataverse.sqlite3")
    org_url = f"https://{args.host}:{args.port}"
    config = DataverseConfig(org_url=org_url, identity_url=args.identity_url, ca_bundle=str(tls.bundle),
                             state_path=state_path, seed=seed,
                             options=Options(strict=args.strict, duplicate_status=args.duplicate_status),
                             variant=OrgVariant.from_json(json.loads(args.variant.read_text()))
                             if args.variant else OrgVariant())
    app = create_app(config)
    print(f"Dataverse emulator: {org_url}/api/data/v9.2 (state: {state_path})", flush=True)
    serve(app, host=args.host, port=args.port, tls=tls, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
