import pytest

from core.config import SETTINGS, MissingSettingError, Settings
from tests.function_index import indexed_functions


def test_missing_required_setting_names_it() -> None:
    settings = Settings(env={})
    with pytest.raises(MissingSettingError) as err:
        _ = settings.graph_tenant_id
    assert "GRAPH_TENANT_ID" in str(err.value)
    assert err.value.setting == "GRAPH_TENANT_ID"


def test_defaults_and_fallbacks() -> None:
    env = {"GRAPH_TENANT_ID": "t1", "GRAPH_CLIENT_ID": "c1", "GRAPH_CLIENT_SECRET": "s",
           "DATAVERSE_URL": "https://org.example.com/"}
    s = Settings(env=env)
    assert s.graph_base_url == "https://graph.microsoft.com/v1.0"
    assert s.dataverse_tenant_id == "t1"
    assert s.dataverse_client_id == "c1"
    assert s.dataverse_client_secret == "s"
    assert s.dataverse_scope == "https://org.example.com/.default"
    assert s.dataverse_api_base == "https://org.example.com/api/data/v9.2"
    assert s.dataverse_authority == "https://login.microsoftonline.com/t1"


def test_cross_tenant_dataverse() -> None:
    env = {"GRAPH_TENANT_ID": "t1", "GRAPH_CLIENT_ID": "c1", "DATAVERSE_TENANT_ID": "t2",
           "DATAVERSE_URL": "https://org", "DATAVERSE_AUTHORITY": "https://adfs.contoso.local/adfs"}
    s = Settings(env=env)
    assert s.dataverse_tenant_id == "t2"
    assert s.dataverse_authority == "https://adfs.contoso.local/adfs"


def test_dataverse_application_user_pool() -> None:
    base = {"GRAPH_TENANT_ID": "t1", "GRAPH_CLIENT_ID": "c1", "GRAPH_CLIENT_SECRET": "s", "DATAVERSE_URL": "https://o"}
    alone = Settings(env=base).dataverse_app_users
    assert [(cid, cred.secret) for cid, cred in alone] == [("c1", "s")]
    pool = Settings(env={**base, "DATAVERSE_CLIENT_IDS": "a1, a2,a3", "DATAVERSE_CLIENT_SECRETS": "x,y,z"})
    assert [(cid, cred.secret) for cid, cred in pool.dataverse_app_users] == [("a1", "x"), ("a2", "y"), ("a3", "z")]
    shared = Settings(env={**base, "DATAVERSE_CLIENT_IDS": "a1,a2", "GRAPH_CLIENT_CERTIFICATE_PATH": "/c.pem"})
    assert [cred.kind for _, cred in shared.dataverse_app_users] == ["certificate", "certificate"]
    with pytest.raises(Exception, match="DATAVERSE_CLIENT_SECRETS has 1 secret"):
        _ = Settings(env={**base, "DATAVERSE_CLIENT_IDS": "a1,a2", "DATAVERSE_CLIENT_SECRETS": "x"}).dataverse_app_users
    with pytest.raises(Exception, match="more than once"):
        _ = Settings(env={**base, "DATAVERSE_CLIENT_IDS": "a1,A1"}).dataverse_app_users


def test_dataverse_budget_values() -> None:
    from core.adapters.dataverse_pool import ServiceProtectionBudget

    default = ServiceProtectionBudget(**Settings(env={}).dataverse_budget_values())
    assert (default.request_cap, default.window_s, default.concurrency_cap) == (5700, 300, 49)
    scaled = Settings(env={"DATAVERSE_USER_REQUESTS_PER_WINDOW": "600", "DATAVERSE_USER_WINDOW_SECONDS": "30",
                           "DATAVERSE_BUDGET_PERCENT": "50"}).dataverse_budget_values()
    assert ServiceProtectionBudget(**scaled).request_cap == 300
    with pytest.raises(Exception, match="DATAVERSE_BUDGET_PERCENT"):
        Settings(env={"DATAVERSE_BUDGET_PERCENT": "120"}).dataverse_budget_values()


def test_bad_integer_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="WEBHOOK_MAX_BODY_BYTES"):
        _ = Settings(env={"WEBHOOK_MAX_BODY_BYTES": "lots"}).webhook_max_body_bytes


def test_secret_settings_flagged() -> None:
    secrets = {s.name for s in SETTINGS if s.secret}
    assert {"GRAPH_CLIENT_SECRET", "DATAVERSE_CLIENT_SECRET", "WEBHOOK_FUNCTION_KEY"} <= secrets


def test_import_function_app_reads_no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    for name in list(sys.modules):
        if name == "function_app" or name.startswith("functions"):
            sys.modules.pop(name)
    monkeypatch.delenv("GRAPH_TENANT_ID", raising=False)
    mod = importlib.import_module("function_app")
    names = list(indexed_functions(mod.app))
    assert "health" in names


# --- Key Vault references App Service could not resolve -------------------------------------------------------
KV_REF = "@Microsoft.KeyVault(SecretUri=https://kv-x.vault.azure.net/secrets/graph-client-secret/)"
BASE_ENV = {"GRAPH_TENANT_ID": "t1", "GRAPH_CLIENT_ID": "c1", "DATAVERSE_URL": "https://org.example.com",
            "WEBHOOK_BASE_URL": "https://app.example.net/api", "AzureWebJobsStorage": "UseDevelopmentStorage=true"}


@pytest.mark.parametrize("value", [
    KV_REF,
    "@Microsoft.KeyVault(VaultName=kv-x;SecretName=graph-client-secret)",
    "  @microsoft.keyvault(SecretUri=https://kv-x.vault.azure.net/secrets/x)",
    "@Microsoft.AppConfiguration(Endpoint=https://ac.azconfig.io; Key=x)",
])
def test_an_unresolved_reference_is_not_a_value(value: str) -> None:
    from core.config import UnresolvedReferenceError, is_unresolved_reference

    assert is_unresolved_reference(value)
    s = Settings(env={**BASE_ENV, "GRAPH_CLIENT_SECRET": value})
    with pytest.raises(UnresolvedReferenceError) as err:
        _ = s.graph_credential
    assert err.value.setting == "GRAPH_CLIENT_SECRET"
    assert isinstance(err.value, MissingSettingError)  # every caller that handles a missing setting handles this
    assert "Key Vault reference not resolved" in str(err.value) and "vault.azure.net" not in str(err.value)


@pytest.mark.parametrize("value", ["s3cret", "Microsoft.KeyVault(x)", "x@Microsoft.KeyVault(y)", ""])
def test_ordinary_values_are_not_references(value: str) -> None:
    from core.config import is_unresolved_reference

    assert not is_unresolved_reference(value)


def test_unresolved_settings_lists_every_literal_reference() -> None:
    from core.config import unresolved_settings

    env = {**BASE_ENV, "GRAPH_CLIENT_SECRET": KV_REF, "WEBHOOK_FUNCTION_KEY": KV_REF.replace("graph-client", "x"),
           "SOMETHING_ELSE": KV_REF, "FINE": "value"}
    assert unresolved_settings(env) == ["GRAPH_CLIENT_SECRET", "SOMETHING_ELSE", "WEBHOOK_FUNCTION_KEY"]
    assert Settings(env=env).unresolved() == unresolved_settings(env)
    assert unresolved_settings(BASE_ENV) == []


def test_configured_says_no_for_an_unresolved_dependency() -> None:
    ok = Settings(env={**BASE_ENV, "GRAPH_CLIENT_SECRET": "s", "WEBHOOK_FUNCTION_KEY": "k"}).configured()
    assert ok == {"storage": True, "graph": True, "dataverse": True, "webhooks": True}
    broken = Settings(env={**BASE_ENV, "GRAPH_CLIENT_SECRET": KV_REF, "WEBHOOK_FUNCTION_KEY": KV_REF}).configured()
    assert broken == {"storage": True, "graph": False, "dataverse": False, "webhooks": False}


def test_webhook_key_reference_fails_where_the_url_is_built() -> None:
    from core.config import UnresolvedReferenceError

    with pytest.raises(UnresolvedReferenceError, match="WEBHOOK_FUNCTION_KEY"):
        _ = Settings(env={**BASE_ENV, "WEBHOOK_FUNCTION_KEY": KV_REF}).webhook_function_key


# --- which credential signs the router in ------------------------------------------------------------------------
def test_credential_precedence_managed_identity_then_certificate_then_secret() -> None:
    env = {**BASE_ENV, "GRAPH_CLIENT_SECRET": "s", "GRAPH_CLIENT_CERTIFICATE_PATH": "/c.pem"}
    assert Settings(env=env).graph_credential.kind == "certificate"
    assert Settings(env={**BASE_ENV, "GRAPH_CLIENT_SECRET": "s"}).graph_credential.kind == "secret"
    mi = Settings(env={**env, "GRAPH_MANAGED_IDENTITY_CLIENT_ID": "uai"}).graph_credential
    assert (mi.kind, mi.managed_identity_client_id, mi.federated_audience) == (
        "managed_identity", "uai", "api://AzureADTokenExchange")
    assert "hunter2" not in repr(Settings(env={**BASE_ENV, "GRAPH_CLIENT_SECRET": "hunter2"}).graph_credential)


def test_managed_identity_makes_a_stale_secret_reference_harmless() -> None:
    s = Settings(env={**BASE_ENV, "GRAPH_MANAGED_IDENTITY_CLIENT_ID": "uai", "GRAPH_CLIENT_SECRET": KV_REF})
    assert s.graph_credential.kind == "managed_identity"
    assert s.dataverse_credential.kind == "managed_identity"
    assert s.configured()["graph"] is True
    assert s.unresolved() == ["GRAPH_CLIENT_SECRET"]  # still reported: someone should clean it up


def test_dataverse_own_credential_wins_over_the_graph_one() -> None:
    env = {**BASE_ENV, "GRAPH_MANAGED_IDENTITY_CLIENT_ID": "uai", "DATAVERSE_CLIENT_SECRET": "dv"}
    assert Settings(env=env).dataverse_credential.secret == "dv"
    env = {**BASE_ENV, "GRAPH_CLIENT_SECRET": "g", "DATAVERSE_CLIENT_CERTIFICATE_PATH": "/dv.pem"}
    assert Settings(env=env).dataverse_credential.certificate_path == "/dv.pem"
    with pytest.raises(MissingSettingError, match="DATAVERSE_CLIENT_SECRET"):
        _ = Settings(env=BASE_ENV).dataverse_credential
    with pytest.raises(MissingSettingError, match="'DATAVERSE_CLIENT_SECRET': Key Vault reference not resolved"):
        _ = Settings(env={**BASE_ENV, "DATAVERSE_CLIENT_SECRET": KV_REF,
                          "GRAPH_CLIENT_SECRET": "g"}).dataverse_credential


async def test_container_close_closes_only_the_clients_it_built() -> None:
    from core.bootstrap import Container

    closed: list[str] = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        async def close(self) -> None:
            closed.append(self.name)

    container = Container(Settings(env={}))
    await container.close()  # nothing built: nothing to close, and no client is built to be closed
    assert closed == [] and not {"graph", "dataverse", "storage"} & set(container.__dict__)
    container.__dict__["graph"] = Client("graph")
    container.__dict__["storage"] = Client("storage")
    await container.close()
    assert closed == ["graph", "storage"]


def test_the_storage_adapter_silences_the_sdk_request_log_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from core.bootstrap import SDK_REQUEST_LOGGER, Container

    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    sdk, azure = logging.getLogger(SDK_REQUEST_LOGGER), logging.getLogger("azure")
    before = sdk.level, azure.level
    try:
        azure.setLevel(logging.INFO)  # as the Functions worker has it: INFO reaches Application Insights
        sdk.setLevel(logging.NOTSET)
        assert sdk.isEnabledFor(logging.INFO)
        monkeypatch.delenv("AZURE_SDK_HTTP_LOGS", raising=False)
        assert Container().storage is not None
        assert not sdk.isEnabledFor(logging.INFO) and sdk.isEnabledFor(logging.WARNING)

        sdk.setLevel(logging.NOTSET)
        monkeypatch.setenv("AZURE_SDK_HTTP_LOGS", "true")
        assert Container().storage is not None
        assert sdk.isEnabledFor(logging.INFO)

        sdk.setLevel(logging.DEBUG)  # a developer's own choice is left alone
        monkeypatch.delenv("AZURE_SDK_HTTP_LOGS")
        assert Container().storage is not None
        assert sdk.level == logging.DEBUG
    finally:
        sdk.setLevel(before[0])
        azure.setLevel(before[1])
