"""Shared fixtures: Azurite (in memory, free ports) and a clean settings cache per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from core.config import reset_settings_cache
from local.azurite import Azurite, start_azurite

# Property tests check what happens, never how fast: Hypothesis' default 200 ms deadline per example fails them on
# a busy 2-core machine (speed is measured by `make bench`). Profiles of single tests still set their own limits.
settings.register_profile("router", deadline=None)
settings.load_profile("router")


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For ``make test`` (pytest-xdist, ``--dist loadgroup``): tests that share a fixture wider than one test (a
    module's stack, the chaos suites' session stack) run on one worker, so that stack starts once; every other
    test goes wherever a worker is free. Without xdist the mark is inert."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _shared_fixture_group(item: pytest.Item) -> str | None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in info.names_closure:
        definitions = info.name2fixturedefs.get(name)
        if not definitions or definitions[-1].scope == "function":
            continue
        definition = definitions[-1]
        if definition.scope == "session":
            if definition.baseid in ("", "tests"):  # plugins' and this file's (Azurite): one per worker is fine
                continue
            return f"session:{definition.baseid}"  # e.g. the chaos stack, shared by two modules
        return f"module:{item.nodeid.split('::', 1)[0]}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: pytest.TestReport) -> Iterator[None]:
    """pytest-xdist ships each report from a worker as UTF-8; the fuzz suites' captured logs can hold lone
    surrogates (hostile input quoted at DEBUG), which would abort the whole run. They travel escaped
    (``\\udXXX``), as the report prints them anyway."""
    outcome = yield
    data = outcome.get_result()
    if data is not None:
        outcome.force_result(_without_surrogates(data))


def _without_surrogates(value: object) -> object:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_without_surrogates(v) for v in value)
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    # Registered here (the root conftest pytest reads before parsing the command line) so that
    # `pytest -m chaos --chaos-full` (make chaos) works from the repository root.
    from tests.chaos.conftest import add_chaos_options

    add_chaos_options(parser)
