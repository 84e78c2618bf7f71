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
