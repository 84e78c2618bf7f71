"""Start the Dataverse emulator in-process for tests: HTTPS on a free loopback port, in-memory SQLite by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulators.common.server import RunningServer, free_port, start_in_thread
from emulators.common.tls import ensure_tls

from .app import DataverseConfig, EmulatorState, create_app
from .protection import Limits
from .service import API_PATH, Options, OrgVariant
from .store import Store

__all__ = ["RunningDataverse", "start_dataverse"]


@dataclass
class RunningDataverse:
    server: RunningServer
    state: EmulatorState

    @property
    def url(self) -> str:
        """The org URL (the token audience), e.g. https://127.0.0.1:54321."""
        return self.server.url

    @property
    def api_url(self) -> str:
        return self.server.url + API_PATH

    @property
    def store(self) -> Store:
        """Direct store access for assertions (reads are safe; the server thread owns writes)."""
        return self.state.store

    def stop(self) -> None:
        self.server.stop()
        self.state.store.close()


def start_dataverse(
    tls_dir: Path,
    identity_url: str | None,
    seed: dict[str, Any] | None = None,
    *,
    state_dir: Path | None = None,
    limits: Limits | None = None,
    variant: OrgVariant | None = None,
    **options: Any,
) -> RunningDataverse:
    """Serve the emulator; ``seed=None`` = the demo seed; ``options`` are :class:`Options` fields
    (``strict``, ``duplicate_status``, ``sendemail_outcome``, ...). ``identity_url=None`` disables auth."""
    tls = ensure_tls(tls_dir)
    port = free_port()
    org_url = f"https://127.0.0.1:{port}"
    config = DataverseConfig(
        org_url=org_url, identity_url=identity_url, ca_bundle=str(tls.bundle),
        state_path=str(state_dir / "dataverse.sqlite3") if state_dir else ":memory:", seed=seed,
        options=Options(**options), limits=limits or Limits(), variant=variant or OrgVariant(),
    )
    app = create_app(config)
    server = start_in_thread(app, port=port, tls=tls)
    return RunningDataverse(server, app.state.emulator)
