"""Shared fixtures: Azurite (in memory, free ports) and a clean settings cache per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.config import reset_settings_cache
from local.azurite import Azurite, start_azurite


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    reset_settings_cache()
    yield
    reset_settings_cache()


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """One in-memory Azurite per test session (tests use unique queue/table names)."""
    az = start_azurite()
    try:
        yield az
    finally:
        az.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    # Registered here (the root conftest pytest reads before parsing the command line) so that
    # `pytest -m chaos --chaos-full` (make chaos) works from the repository root.
    from tests.chaos.conftest import add_chaos_options

    add_chaos_options(parser)
