"""Fuzz runs log thousands of rejections: format every record (so logging code paths run with hostile
values) but keep them out of pytest's report, which would otherwise bury a failure under them."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


class _FormatAndDiscard(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record).encode("utf-8", "backslashreplace")
        self.records += 1


@pytest.fixture(autouse=True)
def _quiet_router_logs() -> Iterator[_FormatAndDiscard]:
    logger = logging.getLogger("emailrouter")
    handler = _FormatAndDiscard()
    previous = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous
