"""Inbound SMTP listener and outbound smarthost relay for the Graph emulator.

The listener is aiosmtpd's threaded Controller: its own event loop in a daemon thread. Deliveries run on one
dedicated worker thread, so a slow store never blocks the SMTP dialogue of other connections, and the `deliver`
callback is never called concurrently with itself (the emulator's store can stay simple).

Replies (RFC 3463 enhanced codes):
    RCPT of an address `accepts_recipient` refuses  -> 550 5.1.1 Recipient address rejected: User unknown
    deliver raised mime.MimeRejected(reason)        -> 554 5.6.0 <reason>
    deliver raised anything else                    -> 451 4.3.0 (temporary: the client retries later)
    more than max_message_bytes of DATA             -> 552 (aiosmtpd; SIZE is advertised in EHLO)
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .mime import MimeRejected

__all__ = ["SmtpListener", "SmtpRelayError", "relay"]

log = logging.getLogger(__name__)

# RFC 5321 §4.5.3.1.6 allows 1000-byte lines; real senders (and Exchange, which accepts them) exceed that, and a
# test harness should not bounce mail that Exchange Online would take. Memory stays bounded by this per line.
_LINE_LENGTH_LIMIT = 1024 * 1024
_REPLY_TEXT = re.compile(r"[^\x20-\x7e]+")


def _reply_text(reason: str) -> str:
    # An SMTP reply is one ASCII line; a reason with CR/LF or non-ASCII would break the dialogue.
    return _REPLY_TEXT.sub(" ", reason).strip()[:400] or "message rejected"


class _Handler:
    def __init__(self, accepts_recipient: Callable[[str], bool], deliver: Callable[[str, list[str], bytes], None],
                 executor: ThreadPoolExecutor) -> None:
        self._accepts = accepts_recipient
        self._deliver = deliver
        self._executor = executor

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            accepted = bool(self._accepts(address))
        except Exception:
            log.exception("recipient check failed")
            return "451 4.3.0 Temporary failure checking the recipient"
        if not accepted:
            log.info("SMTP recipient rejected: %s", address)
            return "550 5.1.1 Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        rcpts = list(envelope.rcpt_tos)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._deliver, mail_from, rcpts, raw)
        except MimeRejected as exc:
            log.warning("SMTP message from %s rejected (%d bytes): %s", mail_from, len(raw), exc.reason)
            return f"554 5.6.0 {_reply_text(exc.reason)}"
        except Exception as exc:
            log.exception("SMTP delivery failed, answered 451: %s", type(exc).__name__)
            return "451 4.3.0 Temporary delivery failure, try again later"
        log.debug("SMTP message from %s delivered to %d recipient(s), %d bytes", mail_from, len(rcpts), len(raw))
        return "250 2.0.0 OK"


class _LenientSMTP(SMTP):
    # Read by SMTP.__init__ for its StreamReader limit and by the DATA loop.
    line_length_limit = _LINE_LENGTH_LIMIT


class _Controller(Controller):
    """Controller that binds its own socket, so port 0 works and `.port` reports the chosen port."""

    def __init__(self, handler: _Handler, host: str, port: int, max_message_bytes: int) -> None:
        super().__init__(handler, hostname=host, port=port, data_size_limit=max_message_bytes,
                         enable_SMTPUTF8=True, decode_data=False, server_hostname="graph-emulator.local")
        self._sock: socket.socket | None = None

    def factory(self) -> SMTP:
        return _LenientSMTP(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        family = socket.AF_INET6 if ":" in self.hostname else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.hostname, self.port))
        except OSError:
            sock.close()
            raise
        # _trigger_server (run by start() once the server is up) connects to self.port: set the real one first.
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        return self.loop.create_server(self._factory_invoker, sock=sock, ssl=self.ssl_context)


class SmtpListener:
    """A real SMTP server on host:port (0 picks a free port) that hands each accepted message to `deliver`."""

    def __init__(self, host: str, port: int, *, accepts_recipient: Callable[[str], bool],
                 deliver: Callable[[str, list[str], bytes], None],
                 max_message_bytes: int = 150 * 1024 * 1024) -> None:
        self._host = host
        self._requested_port = port
        self._accepts = accepts_recipient
        self._deliver = deliver
        self._max = max_message_bytes
        self._executor: ThreadPoolExecutor | None = None
        self._controller: _Controller | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._controller.port if self._controller is not None else self._requested_port

    @property
    def host(self) -> str:
        return self._host

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SMTP listener already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtp-deliver")
        handler = _Handler(self._accepts, self._deliver, self._executor)
        controller = _Controller(handler, self._host, self._requested_port, self._max)
        try:
            controller.start()
        except BaseException:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            raise
        self._controller = controller
        log.info("SMTP listener on %s:%d", self._host, controller.port)

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SmtpListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SmtpRelayError(Exception):
    """The smarthost refused the message or some recipients; `refused` maps recipient -> (code, reply)."""

    def __init__(self, message: str, refused: dict[str, tuple[int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.refused = refused or {}


def relay(host: str, port: int, envelope_from: str, rcpts: Sequence[str], raw: bytes, timeout: float = 30) -> None:
    """Send `raw` to a smarthost. Raises SmtpRelayError if any recipient is refused, smtplib/OSError otherwise."""
    if not rcpts:
        raise SmtpRelayError("no recipients")
    needs_utf8 = not envelope_from.isascii() or any(not r.isascii() for r in rcpts)
    with smtplib.SMTP(host, port, timeout=timeout) as client:
        client.ehlo_or_helo_if_needed()
        options: list[str] = []  # smtplib adds SIZE= itself when the server advertises it
        if not raw.isascii() and client.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if needs_utf8:
            if not client.has_extn("smtputf8"):
                raise SmtpRelayError("smarthost does not support SMTPUTF8 for non-ASCII addresses")
            options.append("SMTPUTF8")
        try:
            refused = client.sendmail(envelope_from, list(rcpts), raw, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            raise SmtpRelayError("all recipients refused", dict(exc.recipients)) from exc
        except smtplib.SMTPResponseException as exc:
            raise SmtpRelayError(f"smarthost refused the message: {exc.smtp_code} {exc.smtp_error!r}") from exc
    if refused:
        raise SmtpRelayError(f"{len(refused)} recipient(s) refused", dict(refused))
