"""azd hooks of the Email Router (azure.yaml), and small operator commands for a deployment.

azd runs the hooks with the environment's values and the deployment outputs in the process environment
(``azd env get-values`` shows them); by hand, export them first (``eval "$(azd env get-values)"``).

  python3 infra/hooks/azd_hooks.py postprovision   federated credential on the app registration(s)
                                                   (appCredential = managedIdentity); the CLI settings file
  python3 infra/hooks/azd_hooks.py postdeploy      webhook key registered on the app; Key Vault references
                                                   resolved (refreshed once if not); first CRM sync, then
                                                   subscription reconcile, run in Azure; /api/health
  python3 infra/hooks/azd_hooks.py run FUNCTION    run a timer function in Azure now (e.g. crm_settings_sync)
  python3 infra/hooks/azd_hooks.py cli-settings    print the emailrouter CLI settings file for the deployment

Needs only the Azure CLI (``az``, signed in) and the standard library. Functions run in Azure through the
host's admin endpoint (``POST /admin/functions/<name>`` with the master key, as Learn's "Manually run a non
HTTP-triggered function"), so they use the app's own identity: no app secret is needed on this machine.
Secrets are never printed; the webhook key is passed to ``az`` as an argument (visible to local process
listings while it runs, like any ``az ... --value``).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

WEBHOOK_KEY_NAME = "graph-webhook"  # the host-level function key Graph's notification URLs carry
WEBHOOK_SECRET_NAME = "webhook-function-key"  # noqa: S105 - a Key Vault secret *name* (main.bicep secretNames)
FIRST_RUN = ("crm_settings_sync", "subscription_reconcile")  # delivery methods first, then subscriptions
REFERENCES_API = "2022-03-01"

Out = Callable[[str], None]


class HookError(RuntimeError):
    """A step failed; the message says what to do."""


class Az:
    """Runs ``az`` and returns its stdout; errors carry az's stderr with any secret argument redacted."""

    def __init__(self, run: Callable[..., Any] = subprocess.run) -> None:
        self._run = run

    def __call__(self, *args: str, secret: str | None = None) -> str:
        result = self._run(["az", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            shown = " ".join(args).replace(secret, "***") if secret else " ".join(args)
            stderr = result.stderr.replace(secret, "***") if secret else result.stderr
            raise HookError(f"az {shown} failed: {stderr.strip()}")
        return str(result.stdout).strip()

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json") or "null")


def _need(env: Mapping[str, str], *names: str) -> list[str]:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise HookError(f"missing {', '.join(missing)}: run through azd, or export `azd env get-values` first")
    return [env[n] for n in names]


# --------------------------------------------------------------------------------------------- postprovision


def cli_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """A ``local.settings.json``-style file for ``emailrouter --settings FILE`` against this deployment.

    Storage through the signed-in operator (``az login``; DefaultAzureCredential), so no ``__clientId`` and no
    connection string; ids and URLs only, never a secret.
    """
    queue, table = _need(env, "AZURE_STORAGE_QUEUE_ENDPOINT", "AZURE_STORAGE_TABLE_ENDPOINT")
    names = ("TABLE_PREFIX", "GRAPH_TENANT_ID", "GRAPH_CLIENT_ID", "DATAVERSE_URL", "DATAVERSE_TENANT_ID",
             "DATAVERSE_CLIENT_ID", "DATAVERSE_CLIENT_IDS", "DATAVERSE_AUTHORITY", "DATAVERSE_SCOPE",
             "WEBHOOK_BASE_URL")
    values = {"AzureWebJobsStorage__queueServiceUri": queue, "AzureWebJobsStorage__tableServiceUri": table}
    values.update({n: env[n] for n in names if env.get(n)})
    return {"IsEncrypted": False, "Values": values}


def ensure_federated_credential(az: Az, app_id: str, issuer: str, subject: str, audience: str) -> str:
    """Add the managed identity as federated identity credential of ``app_id`` unless it is there: 'exists' or
    'created'. Needs Application Administrator / Cloud Application Administrator or ownership of the app."""
    existing = az.json("ad", "app", "federated-credential", "list", "--id", app_id) or []
    if any(c.get("issuer") == issuer and c.get("subject") == subject for c in existing):
        return "exists"
    parameters = {"name": f"email-router-{subject[:8]}", "issuer": issuer, "subject": subject,
                  "description": "Email Router: the Function App's user-assigned managed identity",
                  "audiences": [audience]}
    az("ad", "app", "federated-credential", "create", "--id", app_id, "--parameters", json.dumps(parameters))
    return "created"


def postprovision(az: Az, env: Mapping[str, str], out: Out, root: Path = Path()) -> int:
    status = 0
    if env.get("AZURE_ENV_NAME") and env.get("AZURE_STORAGE_QUEUE_ENDPOINT"):
        target = root / ".azure" / env["AZURE_ENV_NAME"] / "emailrouter.settings.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(cli_settings(env), indent=2) + "\n", encoding="utf-8")
        out(f"CLI settings for this deployment: emailrouter --settings {target} status")
    if env.get("EMAILROUTER_APP_CREDENTIAL", "managedIdentity") != "managedIdentity":
        out("appCredential = clientSecret: the app signs in with the secret in Key Vault")
        return status
    issuer, subject, audience = _need(env, "FEDERATED_CREDENTIAL_ISSUER", "FEDERATED_CREDENTIAL_SUBJECT",
                                      "FEDERATED_TOKEN_AUDIENCE")
    if env.get("GRAPH_TENANT_ID") and env.get("AZURE_TENANT_ID") and \
            env["GRAPH_TENANT_ID"].lower() != env["AZURE_TENANT_ID"].lower():
        out(f"note: Exchange tenant {env['GRAPH_TENANT_ID']} is not the Azure tenant {env['AZURE_TENANT_ID']}: the "
            "app registration must live in the Azure tenant (with the managed identity) and be multi-tenant, "
            "with its service principal in the Exchange tenant (docs/deploy.md, cross-tenant)")
    apps = [env[n] for n in ("GRAPH_CLIENT_ID", "DATAVERSE_CLIENT_ID") if env.get(n)]
    apps += [i.strip() for i in env.get("DATAVERSE_CLIENT_IDS", "").split(",") if i.strip()]  # the pool
    for app_id in dict.fromkeys(apps):
        try:
            result = ensure_federated_credential(az, app_id, issuer, subject, audience)
            out(f"federated credential on app {app_id}: {result} (issuer {issuer}, subject {subject})")
        except HookError as exc:
            status = 1
            parameters = json.dumps({"name": "email-router", "issuer": issuer, "subject": subject,
                                     "audiences": [audience]})
            out(f"ACTION NEEDED: could not add the federated credential to app {app_id} ({exc}). An admin of the "
                f"app registration runs:\n  az ad app federated-credential create --id {app_id} --parameters "
                f"'{parameters}'")
    return status


# --------------------------------------------------------------------------------------------- postdeploy


def register_webhook_key(az: Az, env: Mapping[str, str], out: Out) -> bool:
    """The host key Graph's notification URLs carry, equal to the Key Vault secret the app reads. Returns True when
    a new secret was written to Key Vault (its reference must be refreshed)."""
    group, app, vault = _need(env, "AZURE_RESOURCE_GROUP", "AZURE_FUNCTION_APP_NAME", "AZURE_KEY_VAULT_NAME")
    key, stored = env.get("WEBHOOK_FUNCTION_KEY", ""), False
    if not key:
        try:
            key = az("keyvault", "secret", "show", "--vault-name", vault, "--name", WEBHOOK_SECRET_NAME,
                     "--query", "value", "-o", "tsv")
        except HookError:
            key = ""  # not there yet
    if not key:
        key = secrets.token_hex(32)
        az("keyvault", "secret", "set", "--vault-name", vault, "--name", WEBHOOK_SECRET_NAME, "--value", key,
           "--query", "id", "-o", "tsv", secret=key)
        stored = True
        out(f"webhook key: generated and stored in Key Vault {vault} as {WEBHOOK_SECRET_NAME}")
    az("functionapp", "keys", "set", "-g", group, "-n", app, "--key-type", "functionKeys", "--key-name",
       WEBHOOK_KEY_NAME, "--key-value", key, "--query", "name", "-o", "tsv", secret=key)
    out(f"webhook key: registered on {app} as host key {WEBHOOK_KEY_NAME}")
    return stored


def reference_statuses(az: Az, site_id: str) -> dict[str, str]:
    """App setting -> Key Vault reference status (Resolved, SecretNotFound, AccessToKeyVaultDenied, ...)."""
    doc = az.json("rest", "--method", "get", "--uri",
                  f"{site_id}/config/configreferences/appsettings?api-version={REFERENCES_API}") or {}
    return {str(item.get("name", "")).rsplit("/", 1)[-1]: str((item.get("properties") or {}).get("status", "?"))
            for item in doc.get("value", [])}


def wait_for_references(az: Az, env: Mapping[str, str], out: Out, *, refresh: bool, attempts: int = 12,
                        sleep: Callable[[float], None] = time.sleep, pause_s: float = 15.0) -> dict[str, str]:
    """Poll until every Key Vault reference resolves. App Service fetches references again on a configuration
    change, so after the first failed poll (or at once when ``refresh``) re-apply one unchanged setting."""
    group, app = _need(env, "AZURE_RESOURCE_GROUP", "AZURE_FUNCTION_APP_NAME")
    site_id = az("functionapp", "show", "-g", group, "-n", app, "--query", "id", "-o", "tsv")
    refreshed = False
    bad: dict[str, str] = {}
    for attempt in range(attempts):
        if refresh and not refreshed:
            level = az("functionapp", "config", "appsettings", "list", "-g", group, "-n", app, "--query",
                       "[?name=='LOG_LEVEL'].value | [0]", "-o", "tsv") or "INFO"
            az("functionapp", "config", "appsettings", "set", "-g", group, "-n", app, "--settings",
               f"LOG_LEVEL={level}", "--query", "length(@)", "-o", "tsv")
            refreshed = True
            out("Key Vault references: configuration re-applied so App Service fetches them again")
        statuses = reference_statuses(az, site_id)
        bad = {name: status for name, status in statuses.items() if status != "Resolved"}
        if not bad:
            out(f"Key Vault references: {len(statuses)} resolved")
            return {}
        refresh = True
        if attempt + 1 < attempts:
            sleep(pause_s)
    return bad


def _http(method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes | None = None,
          timeout: float = 60.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - https URL from azd outputs
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


Http = Callable[..., tuple[int, bytes]]


def run_function(az: Az, env: Mapping[str, str], name: str, http: Http = _http) -> None:
    """Run a non-HTTP function in Azure now (the host's admin endpoint with the master key)."""
    group, app, base = _need(env, "AZURE_RESOURCE_GROUP", "AZURE_FUNCTION_APP_NAME", "AZURE_FUNCTION_APP_URL")
    master = az("functionapp", "keys", "list", "-g", group, "-n", app, "--query", "masterKey", "-o", "tsv")
    status, body = http("POST", f"{base.rstrip('/')}/admin/functions/{name}",
                        {"x-functions-key": master, "Content-Type": "application/json"}, b'{"input": ""}')
    if status != 202:
        raise HookError(f"running {name} in Azure answered {status}: {body[:300].decode('utf-8', 'replace')}")


def health(env: Mapping[str, str], http: Http = _http) -> dict[str, Any]:
    (base,) = _need(env, "AZURE_FUNCTION_APP_URL")
    status, body = http("GET", f"{base.rstrip('/')}/api/health")
    if status != 200:
        raise HookError(f"/api/health answered {status}")
    return dict(json.loads(body))


def postdeploy(az: Az, env: Mapping[str, str], out: Out, *, http: Http = _http,
               sleep: Callable[[float], None] = time.sleep) -> int:
    stored = register_webhook_key(az, env, out)
    unresolved = wait_for_references(az, env, out, refresh=stored, sleep=sleep)
    if unresolved:
        out("Key Vault references NOT resolved: " + ", ".join(f"{n} ({s})" for n, s in sorted(unresolved.items()))
            + ". The secret is missing or the identity lacks Key Vault Secrets User; fix it, then run "
              "`azd hooks run postdeploy` (or `python3 infra/hooks/azd_hooks.py postdeploy`).")
        return 1
    wait = float(env.get("EMAILROUTER_FIRST_SYNC_WAIT_SECONDS", "60"))
    for index, name in enumerate(FIRST_RUN):
        run_function(az, env, name, http)
        out(f"started {name} in Azure")
        if index + 1 < len(FIRST_RUN):
            sleep(wait)  # the reconcile reads the mailboxes the sync writes
    report = health(env, http)
    out(f"/api/health: {json.dumps(report, sort_keys=True)}")
    return 0 if report.get("status") == "ok" else 1


# --------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, az: Az | None = None,
         out: Out = print) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    az = az or Az()
    try:
        if args == ["postprovision"]:
            return postprovision(az, env, out)
        if args == ["postdeploy"]:
            return postdeploy(az, env, out)
        if len(args) == 2 and args[0] == "run":
            run_function(az, env, args[1])
            out(f"started {args[1]} in Azure")
            return 0
        if args == ["cli-settings"]:
            out(json.dumps(cli_settings(env), indent=2))
            return 0
    except HookError as exc:
        out(f"error: {exc}")
        return 1
    out(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main())
