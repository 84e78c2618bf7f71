"""``python -m emulators.graph``: serve the Graph mail emulator (HTTPS + SMTP) until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from emulators.common import demo
from emulators.common.server import serve
from emulators.common.tls import ensure_tls

from .app import create_app
from .config import GraphConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulators.graph", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRAPH_EMULATOR_PORT", "8443")))
    parser.add_argument("--smtp-port", type=int, default=int(os.environ.get("GRAPH_EMULATOR_SMTP_PORT", "2525")),
                        help="inbound SMTP listener port (0 = any free port, -1 = no listener)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls-dir", type=Path, default=Path(os.environ.get("EMULATOR_TLS_DIR", ".local/tls")))
    parser.add_argument("--identity-url", default=os.environ.get("IDENTITY_EMULATOR_URL", ""),
                        help="base URL of the identity emulator (its JWKS validates bearer tokens)")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--state-dir", type=Path, help="SQLite file and outbox/ live here (persisted)")
    state.add_argument("--in-memory", action="store_true", help="keep everything in memory (default)")
    parser.add_argument("--seed", type=Path, help="seed JSON file (default: the demo tenant)")
    parser.add_argument("--tenant-id", default=demo.TENANT_ID)
    parser.add_argument("--smarthost", help="host:port to relay external mail to (optional)")
    parser.add_argument("--public-url", help="base URL used in absolute links (default: the request's host)")
    parser.add_argument("--max-subscription-minutes", type=int, default=10070)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.identity_url:
        parser.error("--identity-url (or IDENTITY_EMULATOR_URL) is required: tokens are validated against it")
    tls = ensure_tls(args.tls_dir)
    smarthost = None
    if args.smarthost:
        host, _, port = args.smarthost.rpartition(":")
        smarthost = (host, int(port))
    config = GraphConfig(
        tenant_id=args.tenant_id, identity_url=args.identity_url, ca_bundle=str(tls.bundle),
        state_dir=None if args.in_memory else args.state_dir,
        seed=json.loads(args.seed.read_text()) if args.seed else None,
        smtp_host=args.host, smtp_port=None if args.smtp_port < 0 else args.smtp_port, smarthost=smarthost,
        public_url=args.public_url, max_subscription_minutes=args.max_subscription_minutes,
    )
    app = create_app(config)
    logging.getLogger("emulators.graph").info("Graph emulator on https://%s:%d/v1.0 (SMTP %s)", args.host, args.port,
                                              config.smtp_port)
    serve(app, host=args.host, port=args.port, tls=tls)


if __name__ == "__main__":
    main()
