"""infra/hooks/azd_hooks.py (the azd hooks) with a scripted ``az`` and HTTP: which commands run, in which order,
what is refused, and that no secret is printed."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("azd_hooks", ROOT / "infra" / "hooks" / "azd_hooks.py")
assert _spec is not None and _spec.loader is not None
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

ENV = {
    "AZURE_ENV_NAME": "prod", "AZURE_RESOURCE_GROUP": "rg-x", "AZURE_FUNCTION_APP_NAME": "func-x",
    "AZURE_FUNCTION_APP_URL": "https://func-x.azurewebsites.net", "AZURE_KEY_VAULT_NAME": "kv-x",
    "AZURE_TENANT_ID": "t-azure", "GRAPH_TENANT_ID": "t-azure", "GRAPH_CLIENT_ID": "app-1",
    "DATAVERSE_URL": "https://org.crm4.dynamics.com", "TABLE_PREFIX": "emailrouter",
    "AZURE_STORAGE_QUEUE_ENDPOINT": "https://stx.queue.core.windows.net/",
    "AZURE_STORAGE_TABLE_ENDPOINT": "https://stx.table.core.windows.net/",
    "EMAILROUTER_APP_CREDENTIAL": "managedIdentity",
    "FEDERATED_CREDENTIAL_ISSUER": "https://login.microsoftonline.com/t-azure/v2.0",
    "FEDERATED_CREDENTIAL_SUBJECT": "0f0f0f0f-1111-2222-3333-444444444444",
    "FEDERATED_TOKEN_AUDIENCE": "api://AzureADTokenExchange",
    "EMAILROUTER_FIRST_SYNC_WAIT_SECONDS": "0",
}


class FakeAz:
    """Answers ``az`` by the first rule whose pattern matches the joined arguments; records every call."""

    def __init__(self, rules: list[tuple[str, str | Exception | Callable[[list[str]], str]]]) -> None:
        self.rules = rules
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], **_: Any) -> Any:
        args = argv[1:]
        self.calls.append(args)
        joined = " ".join(args)
        for pattern, answer in self.rules:
            if re.search(pattern, joined):
                if isinstance(answer, Exception):
                    return _Result(1, "", str(answer))
                return _Result(0, answer(args) if callable(answer) else answer, "")
        raise AssertionError(f"unexpected az call: {joined}")

    def ran(self, pattern: str) -> list[str]:
        return [" ".join(c) for c in self.calls if re.search(pattern, " ".join(c))]


class _Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


def _az(rules: list[tuple[str, Any]]) -> tuple[Any, FakeAz]:
    fake = FakeAz(rules)
    return hooks.Az(fake.run), fake


class FakeHttp:
    def __init__(self, health: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.health = health or {"status": "ok", "unresolved": []}

    def __call__(self, method: str, url: str, headers: Any = None, body: Any = None) -> tuple[int, bytes]:
        self.calls.append((method, url, dict(headers or {})))
        if url.endswith("/api/health"):
            return 200, json.dumps(self.health).encode()
        return 202, b""


RESOLVED = json.dumps({"value": [{"name": "func-x/GRAPH_CLIENT_SECRET", "properties": {"status": "Resolved"}},
                                 {"name": "func-x/WEBHOOK_FUNCTION_KEY", "properties": {"status": "Resolved"}}]})


def deploy_rules(references: Any = RESOLVED, secret: Any = "k" * 64) -> list[tuple[str, Any]]:
    return [
        (r"^keyvault secret show", secret),
        (r"^keyvault secret set", "https://kv-x.vault.azure.net/secrets/webhook-function-key/1"),
        (r"^functionapp keys set", "graph-webhook"),
        (r"^functionapp keys list", "master-key-value"),
        (r"^functionapp show", "/subscriptions/s/resourceGroups/rg-x/providers/Microsoft.Web/sites/func-x"),
        (r"^functionapp config appsettings list", "WARNING"),
        (r"^functionapp config appsettings set", "42"),
        (r"^rest --method get", references),
    ]


# --- postprovision ---------------------------------------------------------------------------------------------
def test_postprovision_adds_the_federated_credential_once(tmp_path: Path) -> None:
    az, fake = _az([(r"federated-credential list", "[]"), (r"federated-credential create", "{}")])
    out: list[str] = []
    assert hooks.postprovision(az, ENV, out.append, root=tmp_path) == 0
    [create] = fake.ran("federated-credential create")
    parameters = json.loads(fake.calls[-1][fake.calls[-1].index("--parameters") + 1])
    assert "--id app-1" in create
    assert parameters["issuer"] == ENV["FEDERATED_CREDENTIAL_ISSUER"]
    assert parameters["subject"] == ENV["FEDERATED_CREDENTIAL_SUBJECT"]
    assert parameters["audiences"] == ["api://AzureADTokenExchange"]
    settings = json.loads((tmp_path / ".azure" / "prod" / "emailrouter.settings.json").read_text())
    assert settings["Values"]["AzureWebJobsStorage__tableServiceUri"] == ENV["AZURE_STORAGE_TABLE_ENDPOINT"]
    assert not any(k.endswith("__clientId") or "SECRET" in k for k in settings["Values"])

    existing = json.dumps([{"issuer": ENV["FEDERATED_CREDENTIAL_ISSUER"],
                            "subject": ENV["FEDERATED_CREDENTIAL_SUBJECT"]}])
    az, fake = _az([(r"federated-credential list", existing)])
    assert hooks.postprovision(az, ENV, out.append, root=tmp_path) == 0
    assert fake.ran("create") == []


def test_postprovision_covers_a_separate_dataverse_app_and_warns_cross_tenant(tmp_path: Path) -> None:
    env = {**ENV, "DATAVERSE_CLIENT_ID": "app-2", "GRAPH_TENANT_ID": "t-exchange"}
    az, fake = _az([(r"federated-credential list", "[]"), (r"federated-credential create", "{}")])
    out: list[str] = []
    hooks.postprovision(az, env, out.append, root=tmp_path)
    assert [c.split("--id ")[1].split()[0] for c in fake.ran("create")] == ["app-1", "app-2"]
    assert any("multi-tenant" in line for line in out)


def test_postprovision_without_rights_prints_the_command_and_fails(tmp_path: Path) -> None:
    az, _fake = _az([(r"federated-credential list", RuntimeError("Insufficient privileges"))])
    out: list[str] = []
    assert hooks.postprovision(az, ENV, out.append, root=tmp_path) == 1
    assert any("ACTION NEEDED" in line and "az ad app federated-credential create --id app-1" in line for line in out)


def test_postprovision_with_a_client_secret_touches_no_app_registration(tmp_path: Path) -> None:
    az, fake = _az([])
    assert hooks.postprovision(az, {**ENV, "EMAILROUTER_APP_CREDENTIAL": "clientSecret"}, print, root=tmp_path) == 0
    assert fake.calls == []


# --- postdeploy ---------------------------------------------------------------------------------------------------
def test_postdeploy_registers_the_key_checks_references_runs_sync_then_reconcile() -> None:
    az, fake = _az(deploy_rules())
    http, out = FakeHttp(), []
    assert hooks.postdeploy(az, ENV, out.append, http=http, sleep=lambda s: None) == 0
    [keys_set] = fake.ran("functionapp keys set")
    assert "--key-name graph-webhook" in keys_set and "--key-type functionKeys" in keys_set
    assert fake.ran("keyvault secret set") == []  # the vault had the key
    posts = [(m, u) for m, u, _h in http.calls if m == "POST"]
    assert posts == [("POST", "https://func-x.azurewebsites.net/admin/functions/crm_settings_sync"),
                     ("POST", "https://func-x.azurewebsites.net/admin/functions/subscription_reconcile")]
    assert all(h.get("x-functions-key") == "master-key-value" for m, _u, h in http.calls if m == "POST")
    assert not any("k" * 64 in line or "master-key-value" in line for line in out)


def test_postdeploy_generates_a_missing_key_and_refreshes_the_references() -> None:
    az, fake = _az(deploy_rules(secret=RuntimeError("SecretNotFound")))
    out: list[str] = []
    assert hooks.postdeploy(az, ENV, out.append, http=FakeHttp(), sleep=lambda s: None) == 0
    [stored] = fake.ran("keyvault secret set")
    key = stored.split("--value ")[1].split()[0]
    assert len(key) == 64 and key in fake.ran("functionapp keys set")[0]
    order = [" ".join(c[:4]) for c in fake.calls]
    assert order.index("functionapp config appsettings set") < order.index("rest --method get --uri")
    assert not any(key in line for line in out)


def test_postdeploy_stops_on_unresolved_references_with_their_status() -> None:
    broken = json.dumps({"value": [{"name": "func-x/GRAPH_CLIENT_SECRET",
                                    "properties": {"status": "SecretNotFound"}}]})
    az, fake = _az(deploy_rules(references=broken))
    http, out = FakeHttp(), []
    assert hooks.postdeploy(az, ENV, out.append, http=http, sleep=lambda s: None) == 1
    assert any("GRAPH_CLIENT_SECRET (SecretNotFound)" in line for line in out)
    assert http.calls == []  # nothing run in Azure with a broken configuration
    assert len(fake.ran("appsettings set")) == 1  # refreshed once, not on every poll


def test_postdeploy_fails_when_health_is_degraded() -> None:
    az, _fake = _az(deploy_rules())
    http = FakeHttp({"status": "degraded", "unresolved": ["WEBHOOK_FUNCTION_KEY"]})
    assert hooks.postdeploy(az, ENV, print, http=http, sleep=lambda s: None) == 1


def test_az_errors_never_show_the_secret() -> None:
    az, _fake = _az([(r".*", RuntimeError("bad value s3cr3t"))])
    with pytest.raises(hooks.HookError) as err:
        az("functionapp", "keys", "set", "--key-value", "s3cr3t", secret="s3cr3t")
    assert "s3cr3t" not in str(err.value)


def test_main_usage_and_missing_environment() -> None:
    out: list[str] = []
    assert hooks.main(["nonsense"], env={}, az=_az([])[0], out=out.append) == 2
    assert hooks.main(["cli-settings"], env={}, az=_az([])[0], out=out.append) == 1
    assert "AZURE_STORAGE_QUEUE_ENDPOINT" in out[-1]


# --- azure.yaml wires them ---------------------------------------------------------------------------------------
def test_azure_yaml_runs_the_hooks_and_builds_remotely() -> None:
    doc = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert doc["services"]["api"]["remoteBuild"] is True
    for event in ("postprovision", "postdeploy"):
        hook = doc["hooks"][event]
        for platform in ("posix", "windows"):
            command = hook[platform]["run"]
            assert command.split()[1:] == ["infra/hooks/azd_hooks.py", event], command
            assert command.split()[0] in ("python3", "python")
