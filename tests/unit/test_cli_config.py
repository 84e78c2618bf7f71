"""Where the CLI finds its settings, and what it says when a setting is missing: "no local stack running" is told
apart from "nothing configured", and a deployment in Azure is one `--settings FILE` away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from core.cli import build_parser
from core.cli.commands import CliError, run
from core.cli.config import azure_error_hint, describe_sources, load_values
from core.cli.registry import COMMANDS


def _stack(folder: Path, running: bool) -> None:
    (folder / ".local").mkdir()
    (folder / ".local" / "stack.json").write_text(json.dumps({"running": running}))


def test_nothing_anywhere_is_not_configured_and_says_no_stack(tmp_path: Path) -> None:
    text = describe_sources(None, tmp_path, {})
    assert text.startswith("Not configured")
    assert "No local stack is running" in text and "make run" in text
    assert "No settings file" in text and "No app settings in the environment" in text
    assert "emailrouter --settings .azure/<env>/emailrouter.settings.json" in text


def test_a_stopped_stack_is_named(tmp_path: Path) -> None:
    _stack(tmp_path, running=False)
    below = tmp_path / "sub"
    below.mkdir()
    text = describe_sources(None, below, {})  # found in a parent folder, as the CLI looks
    assert f"A local stack is set up in {tmp_path} but not running" in text
    assert text.startswith("Not configured")


def test_a_running_stack_or_any_source_is_not_not_configured(tmp_path: Path) -> None:
    _stack(tmp_path, running=True)
    assert describe_sources(None, tmp_path, {}).startswith("Using the local stack")
    other = tmp_path / "other"
    other.mkdir()
    settings = other / "emailrouter.settings.json"
    settings.write_text(json.dumps({"Values": {"TABLE_PREFIX": "x"}}))
    text = describe_sources(settings, other, {})
    assert not text.startswith("Not configured") and f"Settings file: {settings}" in text
    text = describe_sources(None, other, {"GRAPH_TENANT_ID": "t", "PATH": "/bin"})
    assert "App settings in the environment: GRAPH_TENANT_ID." in text


def test_deployment_settings_file_needs_no_connection_string(tmp_path: Path) -> None:
    settings = tmp_path / "emailrouter.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": {
        "AzureWebJobsStorage__queueServiceUri": "https://st.queue.core.windows.net/",
        "AzureWebJobsStorage__tableServiceUri": "https://st.table.core.windows.net/"}}))
    values, sources = load_values(settings, tmp_path, {})
    assert sources["AzureWebJobsStorage__tableServiceUri"] == str(settings)
    from core.config import Settings

    Settings(values).require_storage()  # identity-based endpoints are enough; no __clientId = DefaultAzureCredential


def test_the_cli_error_for_a_missing_setting_explains(tmp_path: Path) -> None:
    args = build_parser().parse_args(["status"])
    with pytest.raises(CliError) as err:
        asyncio.run(run(COMMANDS[args._command], args, cwd=tmp_path, environ={}))
    assert err.value.exit_code == 3  # unavailable: not configured
    text = str(err.value)
    assert "AzureWebJobsStorage" in text and "Not configured" in text and "No local stack is running" in text


def test_azure_errors_get_a_next_step() -> None:
    assert "az login" in azure_error_hint(ClientAuthenticationError("no credential"))
    denied = HttpResponseError(message="AuthorizationPermissionMismatch")
    denied.status_code = 403
    assert "Data Contributor" in azure_error_hint(denied)
    assert azure_error_hint(ValueError("x")) == ""
