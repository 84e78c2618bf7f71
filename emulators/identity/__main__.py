"""CLI: ``python -m emulators.identity --port P --tls-dir DIR [--seed FILE] [--token-lifetime SECONDS]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emulators.common.server import serve
from emulators.common.tls import ensure_tls

from .app import IdentityConfig, create_app
from .keys import SIGNING_KEY_FILE, SigningKey
from .seed import SeedError, parse_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.identity", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="HTTPS port on 127.0.0.1")
    parser.add_argument("--tls-dir", type=Path, required=True,
                        help="directory of the local CA/server certificate (created on first run); the token "
                             f"signing key is kept there too ({SIGNING_KEY_FILE})")
    parser.add_argument("--seed", type=Path, help="seed JSON (tenants, apps); default: the demo tenant and app")
    parser.add_argument("--token-lifetime", type=int, default=3600, metavar="SECONDS",
                        help="access token lifetime (default 3600)")
    parser.add_argument("--public-url", help="base URL put in metadata and 'iss' (default: from each request)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    seed = None
    if args.seed:
        try:
            seed = json.loads(args.seed.read_text())
            parse_seed(seed)  # fail fast with the offending field named
        except (OSError, ValueError, SeedError) as exc:
            print(f"invalid seed {args.seed}: {exc}", file=sys.stderr)
            return 2
    if args.token_lifetime < 1:
        parser.error("--token-lifetime must be >= 1")

    tls = ensure_tls(args.tls_dir)
    signing_key = SigningKey.load_or_create(args.tls_dir / SIGNING_KEY_FILE)
    app = create_app(IdentityConfig(seed=seed, token_lifetime_s=args.token_lifetime, signing_key=signing_key,
                                    public_url=args.public_url))
    logging.getLogger("emulators.identity").info(
        "identity emulator on https://127.0.0.1:%s (CA bundle %s)", args.port, tls.bundle)
    serve(app, port=args.port, tls=tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
