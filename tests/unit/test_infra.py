"""Deployment guards: infra/ (Bicep), azure.yaml, host.json and requirements.txt against the code.

The Bicep CLI cannot be installed offline, so every ``.bicep`` file is parsed with the tree-sitter-bicep
grammar and the facts the router depends on are read from the syntax tree:

* no drift: every app setting in ``core.config.SETTINGS`` is set by ``infra/app/appsettings.bicep`` or
  listed in the "App settings the template does not set" table of ``docs/deploy.md``; every queue in
  ``core.names.ALL_QUEUES`` and every table in ``core.names.TABLES`` (default prefix) is created;
  the defaults the template deploys equal the defaults in ``core.config``;
* identity only: no storage keys, Key Vault references for secret settings, deterministic role names;
* Flex Consumption (FC1, Linux, Python 3.11): no site property or app setting that Flex rejects or ignores
  (the Learn "Flex Consumption plan deprecations" table), a scale cap that respects Dataverse's concurrency
  limit with the host.json batch sizes, an always-ready HTTP instance;
* host.json valid for the v2 model; requirements.txt pinned and holding exactly what the deployed code imports
  (what ``.funcignore`` leaves in the package);
* azd: parameters, hooks and ``remoteBuild``; operator data-plane roles; the poison-queue alert;
* each checker is a pure function that returns problems, and is also run on a mutated copy to prove
  that it reports drift (so none of these tests can pass vacuously).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import tree_sitter_bicep
import yaml
from tree_sitter import Language, Node, Parser

from core import config, names
from core.config import Setting

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
HOST_JSON = ROOT / "host.json"
REQUIREMENTS = ROOT / "requirements.txt"
AZURE_YAML = ROOT / "azure.yaml"
PARAMETERS_JSON = INFRA / "main.parameters.json"

OPTIONAL_SECTION = "App settings the template does not set"
APP_SETTINGS_FILE = "app/appsettings.bicep"
STORAGE_FILE = "core/storage.bicep"
RBAC_FILE = "app/rbac.bicep"

_PARSER = Parser(Language(tree_sitter_bicep.language()))

# Built-in role ids (Azure RBAC): the only ones the router's identity may hold ...
ROLE_IDS = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
}
# ... and broad ones that must never appear.
BROAD_ROLE_IDS = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "17d1049b-9a84-46fb-8f53-869881c3d3ab": "Storage Account Contributor",
    "00482a5a-887f-4fb3-b363-3b7fe8e74483": "Key Vault Administrator",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
}

# The operator's data-plane roles (principalId of main.bicep): the CLI's queues and tables, secret rotation.
OPERATOR_ROLE_IDS = {
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
}

# Learn, "App settings reference for Azure Functions" > "Flex Consumption plan deprecations" (2025): app settings
# that are deprecated on Flex Consumption (replaced by functionAppConfig, or not valid) ...
FLEX_FORBIDDEN_SETTINGS = {
    "ENABLE_ORYX_BUILD",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT",
    "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTOVERVNET",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_DNS_SERVER",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_VNET_ROUTE_ALL",
}
# ... and site properties. The table writes most as ``properties.<name>`` although ARM has them under
# ``properties.siteConfig`` (the rejection names ``Site.SiteConfig.FtpsState``): both places are checked.
FLEX_FORBIDDEN_SITE_PROPERTIES = {
    "alwaysOn",
    "containerSize",
    "ftpsState",
    "isReserved",
    "IsXenon",
    "javaVersion",
    "linuxFxVersion",
    "netFrameworkVersion",
    "powerShellVersion",
    "functionAppScaleLimit",
    "preWarmedInstanceCount",
    "use32BitWorkerProcess",
    "vnetBackupRestoreEnabled",
    "vnetContentShareEnabled",
    "vnetImagePullEnabled",
    "vnetRouteAllEnabled",
    "windowsFxVersion",
}

# Scale budget (docs/deploy.md "Scaling"): Dataverse allows 52 concurrent requests per application user (per web
# server; the strict reading counts one). Each queue-triggered instance runs batchSize + newBatchThreshold messages
# at once with at most one Dataverse request each; the timers that read Dataverse add one each, plus one CLI.
DATAVERSE_CONCURRENT_LIMIT = 52
DATAVERSE_TIMERS_AND_CLI = 4


# ---------------------------------------------------------------------------------------------------
# A small reader of Bicep syntax trees
# ---------------------------------------------------------------------------------------------------


class Unresolved(Exception):
    """An expression whose value is only known at deployment time (or that the reader doesn't model)."""


def _named(node: Node) -> list[Node]:
    return [c for c in node.named_children if c.type != "comment"]


def _text(node: Node) -> str:
    return (node.text or b"").decode()


def _after_equals(node: Node) -> Node | None:
    seen = False
    for child in node.children:
        if seen and child.is_named and child.type != "comment":
            return child
        if child.type == "=":
            seen = True
    return None


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str
    body: Node  # the object (inside any loop or condition)
    existing: bool
    loop_var: str | None = None
    loop_iterable: Node | None = None


@dataclass(frozen=True)
class Module:
    symbol: str
    path: str  # relative to infra/, posix
    body: Node


@dataclass
class Bicep:
    path: str  # relative to infra/, posix
    root: Node
    params: dict[str, Node | None]  # name -> default expression
    decorators: dict[str, set[str]]  # param name -> decorator names
    variables: dict[str, Node]
    resources: list[Resource]
    modules: list[Module]
    outputs: dict[str, Node]

    def errors(self) -> list[str]:
        found: list[str] = []

        def walk(node: Node) -> None:
            if node.is_error or node.is_missing:
                kind = "MISSING" if node.is_missing else "ERROR"
                found.append(f"{self.path}:{node.start_point[0] + 1}:{node.start_point[1] + 1}: {kind} {node.type}")
            for child in node.children:
                walk(child)

        walk(self.root)
        return found

    def resources_of(self, type_prefix: str) -> list[Resource]:
        return [r for r in self.resources if r.type.split("@")[0] == type_prefix]


def parse_bicep(text: str, path: str = "<memory>") -> Bicep:
    tree = _PARSER.parse(text.encode())
    root = tree.root_node
    bicep = Bicep(path, root, {}, {}, {}, [], [], {})
    pending: set[str] = set()
    for decl in _named(root):
        if decl.type == "decorators":
            for dec in _named(decl):
                call = _named(dec)[0] if _named(dec) else None
                if call is not None:
                    pending.add(_text(_named(call)[0]) if call.type == "call_expression" else _text(call))
            continue
        kids = _named(decl)
        if decl.has_error:  # reported by errors(); don't index half-parsed declarations
            pending = set()
            continue
        if decl.type == "parameter_declaration":
            name = _text(kids[0])
            bicep.params[name] = _after_equals(decl)
            bicep.decorators[name] = pending
        elif decl.type == "variable_declaration":
            bicep.variables[_text(kids[0])] = _after_equals(decl)  # type: ignore[assignment]
        elif decl.type == "output_declaration":
            bicep.outputs[_text(kids[0])] = _after_equals(decl)  # type: ignore[assignment]
        elif decl.type == "resource_declaration":
            body = _after_equals(decl)
            existing = any(c.type == "existing" for c in decl.children)
            rtype = evaluate(kids[1], bicep)
            loop_var = loop_iterable = None
            if body is not None and body.type == "for_statement":
                parts = _named(body)
                loop_var, loop_iterable, body = _text(parts[0]), parts[1], parts[-1]
            if body is not None and body.type == "if_statement":
                body = _named(body)[-1]
            assert body is not None, f"{path}: resource {_text(kids[0])} has no body"
            bicep.resources.append(Resource(_text(kids[0]), str(rtype), body, existing, loop_var, loop_iterable))
        elif decl.type == "module_declaration":
            body = _after_equals(decl)
            assert body is not None
            target = PurePosixPath(path).parent / str(evaluate(kids[1], bicep))
            bicep.modules.append(Module(_text(kids[0]), _normalise(target), body))
        pending = set()
    return bicep


def _normalise(path: PurePosixPath) -> str:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


_ESCAPES = {"\\'": "'", "\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\$": "$"}


def evaluate(node: Node, bicep: Bicep, env: Mapping[str, Any] | None = None, infra: Infra | None = None) -> Any:
    """Value of a literal-ish expression; params follow the calling module (with ``infra``) or their default."""
    env = env or {}
    kind = node.type
    if kind == "string":
        if node.children and _text(node.children[0]) == "'''":
            return "".join(_text(c) for c in _named(node))
        out = []
        for part in _named(node):
            if part.type == "string_content":
                out.append(_text(part))
            elif part.type == "escape_sequence":
                out.append(_ESCAPES.get(_text(part), _text(part)))
            elif part.type == "interpolation":
                out.append(str(evaluate(_named(part)[0], bicep, env, infra)))
            else:
                raise Unresolved(_text(part))
        return "".join(out)
    if kind == "number":
        return int(_text(node))
    if kind == "boolean":
        return _text(node) == "true"
    if kind == "null":
        return None
    if kind == "array":
        return [evaluate(item, bicep, env, infra) for item in _named(node)]
    if kind == "parenthesized_expression":
        return evaluate(_named(node)[0], bicep, env, infra)
    if kind == "call_expression" and _text(_named(node)[0]) == "string":
        return str(evaluate(_named(_named(node)[1])[0], bicep, env, infra))
    if kind == "identifier":
        name = _text(node)
        if name in env:
            return env[name]
        if name in bicep.variables:
            return evaluate(bicep.variables[name], bicep, env, infra)
        if name in bicep.params:
            if infra is not None:
                caller = infra.caller_argument(bicep.path, name)
                if caller is not None:
                    return evaluate(caller[1], caller[0], {}, infra)
            default = bicep.params[name]
            if default is not None:
                return evaluate(default, bicep, {}, infra)
    raise Unresolved(_text(node))


def property_key(prop: Node, bicep: Bicep) -> str:
    key = _named(prop)[0]
    return _text(key) if key.type == "identifier" else str(evaluate(key, bicep))


def get_property(obj: Node | None, dotted: str, bicep: Bicep) -> Node | None:
    """``obj.a.b`` in an object literal, or None."""
    node = obj
    for step in dotted.split("."):
        if node is None or node.type != "object":
            return None
        node = next((_named(p)[-1] for p in _named(node) if p.type == "object_property"
                     and property_key(p, bicep) == step), None)
    return node


def object_entries(node: Node, bicep: Bicep, depth: int = 0) -> list[tuple[str, Node]]:
    """Keys of an object expression built from literals, variables, union() and conditionals."""
    if depth > 20:
        raise Unresolved("too deep")
    kind = node.type
    if kind == "object":
        return [(property_key(p, bicep), _named(p)[-1]) for p in _named(node) if p.type == "object_property"]
    if kind == "identifier" and _text(node) in bicep.variables:
        return object_entries(bicep.variables[_text(node)], bicep, depth + 1)
    if kind == "parenthesized_expression":
        return object_entries(_named(node)[0], bicep, depth + 1)
    if kind == "ternary_expression":  # both branches count: the setting exists in some configuration
        _cond, yes, no = _named(node)
        return object_entries(yes, bicep, depth + 1) + object_entries(no, bicep, depth + 1)
    if kind == "call_expression" and _text(_named(node)[0]) == "union":
        entries: list[tuple[str, Node]] = []
        for arg in _named(_named(node)[1]):
            entries += object_entries(arg, bicep, depth + 1)
        return entries
    raise Unresolved(f"{bicep.path}: cannot list the keys of {_text(node)[:80]!r}")


def resolve_to_definition(node: Node, bicep: Bicep) -> Node:
    """Follow variable references to the defining expression."""
    while node.type == "identifier" and _text(node) in bicep.variables:
        node = bicep.variables[_text(node)]
    return node


@dataclass
class Infra:
    files: dict[str, Bicep]

    @property
    def main(self) -> Bicep:
        return self.files["main.bicep"]

    def resources_of(self, type_prefix: str) -> list[tuple[Bicep, Resource]]:
        return [(f, r) for f in self.files.values() for r in f.resources_of(type_prefix)]

    def caller_argument(self, module_path: str, param: str) -> tuple[Bicep, Node] | None:
        for f in self.files.values():
            for mod in f.modules:
                if mod.path == module_path:
                    arg = get_property(mod.body, f"params.{param}", f)
                    if arg is not None:
                        return f, arg
        return None

    def app_settings(self) -> dict[str, tuple[Bicep, Node]]:
        found = []
        for f, res in self.resources_of("Microsoft.Web/sites/config"):
            name = get_property(res.body, "name", f)
            if name is not None and evaluate(name, f) == "appsettings":
                found.append((f, res))
        assert len(found) == 1, f"expected one Microsoft.Web/sites/config 'appsettings' resource, found {len(found)}"
        f, res = found[0]
        props = get_property(res.body, "properties", f)
        assert props is not None
        return {key: (f, value) for key, value in object_entries(props, f)}

    def created_names(self, type_prefix: str) -> list[str]:
        out: list[str] = []
        for f, res in self.resources_of(type_prefix):
            name = get_property(res.body, "name", f)
            assert name is not None
            if res.loop_var is None:
                out.append(str(evaluate(name, f, {}, self)))
            else:
                assert res.loop_iterable is not None
                for item in evaluate(res.loop_iterable, f, {}, self):
                    out.append(str(evaluate(name, f, {res.loop_var: item}, self)))
        return out


def bicep_sources(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    sources = {p.relative_to(INFRA).as_posix(): p.read_text(encoding="utf-8") for p in sorted(INFRA.rglob("*.bicep"))}
    sources.update(overrides or {})
    return sources


def load_infra(overrides: Mapping[str, str] | None = None) -> Infra:
    return Infra({path: parse_bicep(text, path) for path, text in bicep_sources(overrides).items()})


def mutate(path: str, old: str, new: str) -> Infra:
    text = (INFRA / path).read_text(encoding="utf-8")
    assert old in text, f"mutation anchor {old!r} not in {path}"
    return load_infra({path: text.replace(old, new, 1)})


# ---------------------------------------------------------------------------------------------------
# Checkers (pure: return a list of problems)
# ---------------------------------------------------------------------------------------------------


def documented_optional_settings(markdown: str) -> set[str]:
    """Setting names in the first column of the table under the ``OPTIONAL_SECTION`` heading."""
    found: set[str] = set()
    inside = False
    for line in markdown.splitlines():
        if line.startswith("#"):
            inside = line.lstrip("#").strip() == OPTIONAL_SECTION
            continue
        if inside and line.startswith("|"):
            match = re.match(r"\|\s*`([A-Za-z0-9_]+)`", line)
            if match:
                found.add(match.group(1))
    return found


def check_settings(specs: Sequence[Setting], in_bicep: Iterable[str], documented: Iterable[str]) -> list[str]:
    in_bicep, documented = set(in_bicep), set(documented)
    problems = []
    known = {s.name for s in specs}
    for spec in specs:
        if spec.name in in_bicep:
            continue
        if spec.required:
            problems.append(f"{spec.name}: required by core/config.py but not set in {APP_SETTINGS_FILE}")
        elif spec.name not in documented:
            problems.append(f"{spec.name}: neither set in {APP_SETTINGS_FILE} nor listed under "
                            f"'{OPTIONAL_SECTION}' in docs/deploy.md")
    for name in sorted(documented - known):
        problems.append(f"{name}: listed in docs/deploy.md but not in core.config.SETTINGS (stale)")
    for name in sorted(documented & in_bicep):
        problems.append(f"{name}: listed as not set by the template, but {APP_SETTINGS_FILE} sets it")
    return problems


def check_defaults(specs: Sequence[Setting], infra: Infra) -> list[str]:
    """A setting the template sets from a literal (or a parameter default) must equal core/config's default."""
    settings = infra.app_settings()
    problems = []
    for spec in specs:
        if spec.default is None or spec.name not in settings:
            continue
        f, node = settings[spec.name]
        try:
            value = evaluate(node, f, {}, infra)
        except Unresolved:
            continue  # computed at deployment time (e.g. environment().authentication.loginEndpoint)
        if str(value) != spec.default:
            problems.append(f"{spec.name}: template deploys {value!r}, core/config.py default is {spec.default!r}")
    return problems


def check_created(kind: str, expected: Iterable[str], created: Iterable[str]) -> list[str]:
    created = set(created)
    return [f"{kind} {name!r} is used by the code but not created in infra/" for name in expected
            if name not in created]


def check_role_assignment_names(infra: Infra) -> list[str]:
    problems = []
    for f, res in infra.resources_of("Microsoft.Authorization/roleAssignments"):
        name = get_property(res.body, "name", f)
        ok = (name is not None and name.type == "call_expression" and _text(_named(name)[0]) == "guid"
              and len(_named(_named(name)[1])) >= 3)
        if not ok:
            problems.append(f"{f.path}: role assignment {res.symbol} is not named guid(scope, principal, role)")
        role = get_property(res.body, "properties.roleDefinitionId", f)
        if role is None or "subscriptionResourceId('Microsoft.Authorization/roleDefinitions'" not in _text(role):
            problems.append(f"{f.path}: role assignment {res.symbol} has no built-in roleDefinitionId")
    return problems


def _site_config_bodies(infra: Infra) -> list[tuple[Bicep, str, Node]]:
    """(file, where, object) for every site body and every ``sites/config`` resource's properties."""
    found: list[tuple[Bicep, str, Node]] = []
    for f, res in infra.resources_of("Microsoft.Web/sites"):
        if res.existing:
            continue
        props = get_property(res.body, "properties", f)
        if props is not None:
            found.append((f, "properties", props))
        site_config = get_property(res.body, "properties.siteConfig", f)
        if site_config is not None:
            found.append((f, "siteConfig", site_config))
    for f, res in infra.resources_of("Microsoft.Web/sites/config"):
        name = evaluate(get_property(res.body, "name", f), f)  # type: ignore[arg-type]
        props = get_property(res.body, "properties", f)
        if props is not None:
            found.append((f, f"config/{name}", props))
    return found


def check_flex_site(infra: Infra) -> list[str]:
    """Site properties and app settings that Flex Consumption rejects or ignores, wherever they are written."""
    forbidden_props = {p.lower() for p in FLEX_FORBIDDEN_SITE_PROPERTIES}
    forbidden_settings = {s.lower() for s in FLEX_FORBIDDEN_SETTINGS}
    problems = []
    for f, where, obj in _site_config_bodies(infra):
        if where == "config/appsettings":
            names = [key for key, _value in object_entries(obj, f)]
        else:
            names = []
            problems += [f"{f.path}: {where}.{k} is not valid on Flex Consumption"
                         for k, _value in object_entries(obj, f) if k.lower() in forbidden_props]
            app_settings = get_property(obj, "appSettings", f)
            if app_settings is not None and app_settings.type == "array":
                names = [str(evaluate(get_property(item, "name", f), f)) for item in _named(app_settings)]  # type: ignore[arg-type]
        problems += [f"{f.path}: app setting {n} is deprecated on Flex Consumption" for n in names
                     if n.lower() in forbidden_settings]
    return problems


def scale_groups(app: Any) -> int:
    """Flex Consumption scale groups of a FunctionApp: all HTTP functions together, every other function alone."""
    from tests.function_index import indexed_functions

    kinds = [next(b.type for b in f.get_bindings() if b.type.endswith("Trigger"))
             for f in indexed_functions(app).values()]
    return (1 if "httpTrigger" in kinds else 0) + sum(1 for k in kinds if k != "httpTrigger")


def check_scale_budget(max_instances: int, always_ready: int, host: Mapping[str, Any], groups: int, *,
                       application_users: int = 1) -> list[str]:
    """``host``: host.json as Azure runs it (with the ``AzureFunctionsJobHost__*`` app-setting overrides applied)."""
    queues = (host.get("extensions") or {}).get("queues") or {}
    per_instance = int(queues.get("batchSize", 16)) + int(queues.get("newBatchThreshold", 8))
    worst = (max_instances - always_ready) * per_instance + DATAVERSE_TIMERS_AND_CLI
    limit = DATAVERSE_CONCURRENT_LIMIT * application_users
    problems = []
    if worst > limit:
        problems.append(f"({max_instances} - {always_ready}) instances x {per_instance} messages + "
                        f"{DATAVERSE_TIMERS_AND_CLI} = {worst} concurrent Dataverse requests > "
                        f"{DATAVERSE_CONCURRENT_LIMIT} x {application_users} application user(s)")
    if max_instances < groups:
        problems.append(f"maximumInstanceCount {max_instances} < {groups} scale groups: some would wait")
    return problems


_SECRET_PATTERNS = {
    "storage account key": re.compile(r"AccountKey\s*=", re.I),
    "SAS token": re.compile(r"SharedAccessSignature\s*=|[?&]sig=[A-Za-z0-9%]", re.I),
    "instrumentation key": re.compile(r"InstrumentationKey\s*=\s*[0-9a-f]{8}-", re.I),
    "Entra client secret": re.compile(r"[A-Za-z0-9_\-]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "function key in a URL": re.compile(r"[?&]code=[A-Za-z0-9_\-]{8,}"),
    "listKeys/listSecrets call": re.compile(r"\blist(Keys|Secrets)\s*\(", re.I),
    "long base64 literal": re.compile(r"['\"][A-Za-z0-9+/]{40,}={0,2}['\"]"),
}


def check_no_secret_literals(sources: Mapping[str, str]) -> list[str]:
    problems = []
    for path, text in sources.items():
        for label, pattern in _SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path}:{line}: looks like a {label}")
    return problems


# (The App Insights connection string is not a credential, and storage connection strings are banned outright.)
_SECRET_PARAM = re.compile(r"(secret|password|functionkey|apikey)$", re.I)
_SECRET_OUTPUT = re.compile(r"SECRET|PASSWORD|_KEY$|FUNCTION_KEY|CONNECTION_STRING", re.I)


def check_secure_params_and_outputs(infra: Infra) -> list[str]:
    problems = []
    for f in infra.files.values():
        secure = {name for name, decs in f.decorators.items() if "secure" in decs}
        for name, default in f.params.items():
            if _SECRET_PARAM.search(name) and name not in secure:
                problems.append(f"{f.path}: parameter {name} looks secret but is not @secure()")
            if name in secure and default is not None and _text(default) != "''":
                problems.append(f"{f.path}: @secure() parameter {name} has a non-empty default")
        for out_name, value in f.outputs.items():
            idents = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _text(value)))
            if idents & secure:
                problems.append(f"{f.path}: output {out_name} exposes a @secure() parameter")
            if f.path == "main.bicep" and _SECRET_OUTPUT.search(out_name):
                problems.append(f"main.bicep: output {out_name} looks like a secret")
    return problems


def check_host_json(host: Mapping[str, Any]) -> list[str]:
    problems = []
    if host.get("version") != "2.0":
        problems.append("host.json: version must be '2.0'")
    bundle = host.get("extensionBundle") or {}
    if bundle.get("id") != "Microsoft.Azure.Functions.ExtensionBundle":
        problems.append("host.json: extensionBundle.id must be Microsoft.Azure.Functions.ExtensionBundle")
    match = re.fullmatch(r"\[(\d+)\.\*,\s*(\d+)\.0\.0\)", str(bundle.get("version", "")))
    if not match or int(match.group(1)) < 4 or int(match.group(2)) != int(match.group(1)) + 1:
        problems.append(f"host.json: extension bundle range {bundle.get('version')!r} is not '[N.*, N+1.0.0)' "
                        "with N >= 4 (Flex Consumption needs bundle 4.x or later)")
    queues = (host.get("extensions") or {}).get("queues") or {}
    batch = queues.get("batchSize", 16)
    if not isinstance(batch, int) or not 1 <= batch <= 32:
        problems.append(f"host.json: queues.batchSize {batch!r} must be 1..32")
    threshold = queues.get("newBatchThreshold", 0)
    if not isinstance(threshold, int) or threshold < 0:
        problems.append(f"host.json: queues.newBatchThreshold {threshold!r} must be >= 0")
    dequeue = queues.get("maxDequeueCount", 5)
    if not isinstance(dequeue, int) or dequeue < 1:
        problems.append(f"host.json: queues.maxDequeueCount {dequeue!r} must be >= 1")
    if queues.get("messageEncoding", "base64") not in ("base64", "none"):
        problems.append("host.json: queues.messageEncoding must be 'base64' or 'none'")
    for key in ("visibilityTimeout", "maxPollingInterval"):
        if key in queues and _timespan_seconds(queues[key]) is None:
            problems.append(f"host.json: queues.{key} {queues[key]!r} is not hh:mm:ss")
    polling = _timespan_seconds(queues.get("maxPollingInterval", "00:01:00"))
    if polling is not None and polling < 0.1:
        problems.append("host.json: queues.maxPollingInterval must be at least 100 ms")
    if "functionTimeout" in host and _timespan_seconds(host["functionTimeout"]) is None:
        problems.append(f"host.json: functionTimeout {host['functionTimeout']!r} is not hh:mm:ss")
    prefix = ((host.get("extensions") or {}).get("http") or {}).get("routePrefix", "api")
    if not isinstance(prefix, str):
        problems.append("host.json: http.routePrefix must be a string")
    return problems


def _timespan_seconds(value: Any) -> float | None:
    match = re.fullmatch(r"(?:(\d+)\.)?(\d{2}):(\d{2}):(\d{2}(?:\.\d+)?)", str(value))
    if not match:
        return None
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def check_requirements(text: str) -> list[str]:
    problems = []
    pinned: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*(?:\[[A-Za-z0-9,._\-]+\])?)==([A-Za-z0-9.+!\-]+)", line)
        if not match:
            problems.append(f"requirements.txt:{number}: {line!r} is not pinned with ==")
            continue
        pinned[re.sub(r"[-_.]+", "-", match.group(1).split("[")[0].lower())] = match.group(2)
    version = pinned.get("azure-functions")
    if version is None or not version.startswith("1."):
        problems.append("requirements.txt: azure-functions must be pinned to a 1.x version")
    if "azure-functions-worker" in pinned:
        problems.append("requirements.txt: azure-functions-worker is provided by the platform; remove it")
    return problems


def _iter_files(*globs: str) -> Iterator[Path]:
    for pattern in globs:
        yield from sorted(INFRA.rglob(pattern))


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infra() -> Infra:
    return load_infra()


@pytest.fixture(scope="module")
def settings(infra: Infra) -> dict[str, tuple[Bicep, Node]]:
    return infra.app_settings()


@pytest.fixture(scope="module")
def documented() -> set[str]:
    return documented_optional_settings(DEPLOY_DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def host_json() -> dict[str, Any]:
    return json.loads(HOST_JSON.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------------


def test_infra_has_the_expected_bicep_files(infra: Infra) -> None:
    assert {"main.bicep", APP_SETTINGS_FILE, STORAGE_FILE, RBAC_FILE} <= set(infra.files)
    for f in infra.files.values():
        for mod in f.modules:
            assert mod.path in infra.files, f"{f.path}: module {mod.symbol} points at missing {mod.path}"


@pytest.mark.parametrize("path", sorted(bicep_sources()))
def test_bicep_file_parses_without_error_nodes(path: str) -> None:
    bicep = parse_bicep((INFRA / path).read_text(encoding="utf-8"), path)
    assert bicep.errors() == []
    assert _named(bicep.root), f"{path} is empty"


@pytest.mark.parametrize("old,new", [
    ("  properties: union(", "  properties: union(("),        # unbalanced parenthesis
    ("resource appSettings", "resource appSettings appSettings"),  # stray token
    ("'appsettings'", "'appsettings"),                      # unterminated string
])
def test_syntax_check_reports_broken_bicep(old: str, new: str) -> None:
    text = (INFRA / APP_SETTINGS_FILE).read_text(encoding="utf-8")
    assert old in text
    assert parse_bicep(text.replace(old, new, 1), APP_SETTINGS_FILE).errors() != []


# ---------------------------------------------------------------------------------------------------
# App settings vs core/config.py
# ---------------------------------------------------------------------------------------------------


def test_every_config_setting_is_deployed_or_documented_optional(settings, documented) -> None:
    assert check_settings(config.SETTINGS, settings, documented) == []


def test_settings_check_reports_new_settings_nobody_deployed(settings, documented) -> None:
    extra = (Setting("NEW_REQUIRED_THING", None, "x"), Setting("NEW_OPTIONAL_THING", None, "x", optional=True),
             Setting("NEW_DEFAULTED_THING", "5", "x"))
    problems = check_settings(config.SETTINGS + extra, settings, documented)
    assert len(problems) == 3
    assert all(any(n in p for p in problems) for n in ("NEW_REQUIRED_THING", "NEW_OPTIONAL_THING",
                                                       "NEW_DEFAULTED_THING"))


def test_settings_check_reports_a_setting_removed_from_bicep(documented) -> None:
    mutated = mutate(APP_SETTINGS_FILE, "  LOG_LEVEL: logLevel\n", "")
    problems = check_settings(config.SETTINGS, mutated.app_settings(), documented)
    assert problems == [f"LOG_LEVEL: neither set in {APP_SETTINGS_FILE} nor listed under "
                        f"'{OPTIONAL_SECTION}' in docs/deploy.md"]
    mutated = mutate(APP_SETTINGS_FILE, "  DATAVERSE_URL: dataverseUrl\n", "")
    assert any("DATAVERSE_URL: required" in p
               for p in check_settings(config.SETTINGS, mutated.app_settings(), documented | {"DATAVERSE_URL"}))


def test_settings_check_reports_stale_documentation(settings, documented) -> None:
    problems = check_settings(config.SETTINGS, settings, documented | {"NO_SUCH_SETTING", "LOG_LEVEL"})
    assert len(problems) == 2


def test_docs_have_the_optional_settings_section(documented) -> None:
    # Without the heading the parser would find nothing and only "required" settings would be guarded.
    headings = [line.lstrip("#").strip() for line in DEPLOY_DOC.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    assert OPTIONAL_SECTION in headings
    assert documented <= {s.name for s in config.SETTINGS}


def test_deployed_defaults_equal_config_defaults(infra: Infra) -> None:
    assert check_defaults(config.SETTINGS, infra) == []


def test_defaults_check_reports_a_diverging_default() -> None:
    mutated = mutate("main.bicep", "param deltaCatchupSchedule string = '0 */5 * * * *'",
                     "param deltaCatchupSchedule string = '0 */7 * * * *'")
    assert check_defaults(config.SETTINGS, mutated) == [
        "DELTA_CATCHUP_SCHEDULE: template deploys '0 */7 * * * *', core/config.py default is '0 */5 * * * *'"
    ]


def test_secret_settings_are_key_vault_references(settings) -> None:
    for spec in config.SETTINGS:
        if spec.secret and spec.name in settings:
            f, node = settings[spec.name]
            definition = resolve_to_definition(node, f)
            assert definition.type == "string", f"{spec.name} must be a Key Vault reference string"
            assert _text(definition).startswith("'@Microsoft.KeyVault(SecretUri=${"), spec.name
    assert "GRAPH_CLIENT_SECRET" in settings


def test_host_storage_is_identity_based(settings) -> None:
    for key in ("AzureWebJobsStorage__blobServiceUri", "AzureWebJobsStorage__queueServiceUri",
                "AzureWebJobsStorage__tableServiceUri", "AzureWebJobsStorage__clientId"):
        assert key in settings, key
    f, credential = settings["AzureWebJobsStorage__credential"]
    assert evaluate(credential, f) == "managedidentity"
    assert "AzureWebJobsStorage" not in settings, "no storage connection string: shared keys are off"
    f, auth = settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    assert re.fullmatch(r"'ClientId=\$\{\w+\};Authorization=AAD'", _text(auth))
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings


def test_no_setting_or_site_property_that_flex_consumption_rejects(infra: Infra) -> None:
    assert infra.resources_of("Microsoft.Web/sites")
    assert check_flex_site(infra) == []


@pytest.mark.parametrize(("path", "old", "new", "expected"), [
    ("app/api.bicep", "      minTlsVersion: '1.2'\n", "      minTlsVersion: '1.2'\n      ftpsState: 'Disabled'\n",
     "siteConfig.ftpsState"),
    ("app/api.bicep", "      minTlsVersion: '1.2'\n", "      minTlsVersion: '1.2'\n      alwaysOn: false\n",
     "siteConfig.alwaysOn"),
    ("app/api.bicep", "    httpsOnly: true\n", "    httpsOnly: true\n    LinuxFxVersion: 'Python|3.11'\n",
     "properties.LinuxFxVersion"),
    ("app/api.bicep", "      minTlsVersion: '1.2'\n",
     "      minTlsVersion: '1.2'\n      appSettings: [\n        {\n          name: 'WEBSITE_RUN_FROM_PACKAGE'\n"
     "          value: '1'\n        }\n      ]\n", "WEBSITE_RUN_FROM_PACKAGE"),
    (APP_SETTINGS_FILE, "  LOG_LEVEL: logLevel\n", "  LOG_LEVEL: logLevel\n  FUNCTIONS_WORKER_RUNTIME: 'python'\n",
     "FUNCTIONS_WORKER_RUNTIME"),
    (APP_SETTINGS_FILE, "  LOG_LEVEL: logLevel\n", "  LOG_LEVEL: logLevel\n  functions_extension_version: '~4'\n",
     "functions_extension_version"),
])
def test_flex_check_reports_each_forbidden_key(path: str, old: str, new: str, expected: str) -> None:
    problems = check_flex_site(mutate(path, old, new))
    assert len(problems) == 1 and expected in problems[0], problems


def test_webhook_base_url_is_the_apps_own_api_route(infra: Infra, settings, host_json) -> None:
    prefix = host_json.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    f, node = settings["WEBHOOK_BASE_URL"]
    assert node.type == "identifier" and _text(node) in f.params
    caller = infra.caller_argument(f.path, _text(node))
    assert caller is not None
    definition = resolve_to_definition(caller[1], caller[0])
    assert re.fullmatch(r"'https://\$\{[\w.]+\.defaultHostName\}/" + re.escape(prefix) + "'", _text(definition))


# ---------------------------------------------------------------------------------------------------
# Queues and tables vs core/names.py
# ---------------------------------------------------------------------------------------------------


def _default_prefix() -> str:
    return next(s.default for s in config.SETTINGS if s.name == "TABLE_PREFIX") or ""


def _expected_tables() -> list[str]:
    return [names.table_name(_default_prefix(), t) for t in names.TABLES]


def test_every_queue_including_poison_is_created(infra: Infra) -> None:
    created = infra.created_names("Microsoft.Storage/storageAccounts/queueServices/queues")
    assert {q + names.POISON_SUFFIX for q in names.QUEUES} <= set(names.ALL_QUEUES)
    assert check_created("queue", names.ALL_QUEUES, created) == []


def test_every_table_is_created_with_the_default_prefix(infra: Infra) -> None:
    created = infra.created_names("Microsoft.Storage/storageAccounts/tableServices/tables")
    assert check_created("table", _expected_tables(), created) == []


def test_queue_and_table_checks_report_drift() -> None:
    mutated = mutate(STORAGE_FILE, "  'mailbox-sync-poison'\n", "")
    created = mutated.created_names("Microsoft.Storage/storageAccounts/queueServices/queues")
    assert check_created("queue", names.ALL_QUEUES, created) == [
        "queue 'mailbox-sync-poison' is used by the code but not created in infra/"]
    mutated = mutate(STORAGE_FILE, "  'PoisonLog'\n", "")
    created = mutated.created_names("Microsoft.Storage/storageAccounts/tableServices/tables")
    assert check_created("table", _expected_tables(), created) == [
        f"table '{_default_prefix()}PoisonLog' is used by the code but not created in infra/"]
    created = load_infra().created_names("Microsoft.Storage/storageAccounts/queueServices/queues")
    assert check_created("queue", (*names.ALL_QUEUES, "new-queue"), created) != []


def test_queue_and_table_names_are_valid_for_azure_storage(infra: Infra) -> None:
    for queue in infra.created_names("Microsoft.Storage/storageAccounts/queueServices/queues"):
        assert re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]", queue), queue
    for table in infra.created_names("Microsoft.Storage/storageAccounts/tableServices/tables"):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", table), table


# ---------------------------------------------------------------------------------------------------
# Platform shape: Flex Consumption, identity, Key Vault, monitoring
# ---------------------------------------------------------------------------------------------------


def test_function_app_is_flex_consumption_python_311(infra: Infra) -> None:
    [(pf, plan)] = infra.resources_of("Microsoft.Web/serverfarms")
    assert evaluate(get_property(plan.body, "sku.name", pf), pf) == "FC1"
    assert evaluate(get_property(plan.body, "sku.tier", pf), pf) == "FlexConsumption"
    assert evaluate(get_property(plan.body, "properties.reserved", pf), pf) is True
    sites = [(f, r) for f, r in infra.resources_of("Microsoft.Web/sites") if not r.existing]
    assert len(sites) == 1
    f, site = sites[0]
    assert evaluate(get_property(site.body, "kind", f), f) == "functionapp,linux"
    assert evaluate(get_property(site.body, "properties.functionAppConfig.runtime.name", f), f) == "python"
    version = evaluate(get_property(site.body, "properties.functionAppConfig.runtime.version", f), f, {}, infra)
    assert version == "3.11"
    assert evaluate(get_property(site.body, "identity.type", f), f) == "UserAssigned"
    assert get_property(site.body, "properties.keyVaultReferenceIdentity", f) is not None
    assert evaluate(get_property(site.body, "properties.httpsOnly", f), f) is True
    auth = get_property(site.body, "properties.functionAppConfig.deployment.storage.authentication.type", f)
    assert evaluate(auth, f) == "UserAssignedIdentity"
    for knob in ("instanceMemoryMB", "maximumInstanceCount"):
        node = get_property(site.body, f"properties.functionAppConfig.scaleAndConcurrency.{knob}", f)
        assert node is not None and _text(node) in f.params, knob
        assert knob in infra.main.params, f"{knob} must be a parameter of main.bicep"
        caller = infra.caller_argument(f.path, _text(node))
        assert caller is not None and _text(caller[1]) == knob
    tags = get_property(site.body, "tags", f)
    assert tags is not None and "'azd-service-name': serviceName" in _text(tags)  # azd finds the app by this tag


def test_identity_only_storage_monitoring_and_key_vault(infra: Infra) -> None:
    [(f, account)] = [(f, r) for f, r in infra.resources_of("Microsoft.Storage/storageAccounts") if not r.existing]
    assert evaluate(get_property(account.body, "properties.allowSharedKeyAccess", f), f) is False
    assert evaluate(get_property(account.body, "properties.allowBlobPublicAccess", f), f) is False
    [(f, ai)] = [(f, r) for f, r in infra.resources_of("Microsoft.Insights/components") if not r.existing]
    assert evaluate(get_property(ai.body, "properties.DisableLocalAuth", f), f) is True
    assert get_property(ai.body, "properties.WorkspaceResourceId", f) is not None
    [(f, vault)] = [(f, r) for f, r in infra.resources_of("Microsoft.KeyVault/vaults") if not r.existing]
    assert evaluate(get_property(vault.body, "properties.enableRbacAuthorization", f), f) is True
    [(f, _uami)] = infra.resources_of("Microsoft.ManagedIdentity/userAssignedIdentities")
    [(f, container)] = infra.resources_of("Microsoft.Storage/storageAccounts/blobServices/containers")
    assert evaluate(get_property(container.body, "properties.publicAccess", f), f) == "None"


def test_graph_and_dataverse_are_parameterised_separately(infra: Infra) -> None:
    for param in ("graphTenantId", "graphClientId", "graphClientSecret", "dataverseUrl", "dataverseTenantId",
                  "dataverseClientId", "dataverseClientSecret", "dataverseAuthority", "dataverseScope"):
        assert param in infra.main.params, param


# ---------------------------------------------------------------------------------------------------
# RBAC
# ---------------------------------------------------------------------------------------------------


def test_role_assignments_have_deterministic_guid_names(infra: Infra) -> None:
    assert infra.resources_of("Microsoft.Authorization/roleAssignments")
    assert check_role_assignment_names(infra) == []


def test_role_name_check_reports_a_fixed_name() -> None:
    mutated = mutate(RBAC_FILE, "name: guid(vault.id, principalId, roles.keyVaultSecretsUser)",
                     "name: 'secrets-user'")
    assert check_role_assignment_names(mutated) == [
        f"{RBAC_FILE}: role assignment secretsUser is not named guid(scope, principal, role)"]


def role_grants(infra: Infra) -> list[tuple[str, str, str, set[str]]]:
    """(assignment, principal expression, principalType expression, role ids it can grant) per role assignment."""
    grants = []
    for f, res in infra.resources_of("Microsoft.Authorization/roleAssignments"):
        role = get_property(res.body, "properties.roleDefinitionId", f)
        assert role is not None and role.type == "call_expression"
        arg = _text(_named(_named(role)[1])[-1])
        if res.loop_var is not None and arg == res.loop_var:
            candidates = re.findall(r"[A-Za-z_]\w*\.\w+", _text(res.loop_iterable))  # type: ignore[arg-type]
            for name in re.findall(r"\b([a-z]\w*)\b", _text(res.loop_iterable)):  # type: ignore[arg-type]
                definition = f.variables.get(name)
                if definition is not None and definition.type == "array":
                    candidates += [_text(item) for item in _named(definition)]
        else:
            candidates = [arg]
        ids = set()
        for candidate in candidates:
            table, _, key = candidate.partition(".")
            value = get_property(f.variables.get(table), key, f)
            if value is not None:
                ids.add(str(evaluate(value, f)))
        principal = _text(get_property(res.body, "properties.principalId", f))  # type: ignore[arg-type]
        kind = _text(get_property(res.body, "properties.principalType", f))  # type: ignore[arg-type]
        grants.append((f"{f.path}:{res.symbol}", principal, kind, ids))
    return grants


def check_role_grants(infra: Infra) -> list[str]:
    problems = []
    for name, principal, kind, ids in role_grants(infra):
        if not ids:
            problems.append(f"{name}: role id not found")
        allowed = OPERATOR_ROLE_IDS if principal == "operatorPrincipalId" else ROLE_IDS
        if principal not in ("principalId", "operatorPrincipalId"):
            problems.append(f"{name}: unexpected principal {principal}")
        if principal == "principalId" and kind != "'ServicePrincipal'":
            problems.append(f"{name}: the app identity is a ServicePrincipal")
        if principal == "operatorPrincipalId" and kind != "operatorPrincipalType":
            problems.append(f"{name}: the operator's principalType must be the operatorPrincipalType parameter")
        problems += [f"{name}: grants {BROAD_ROLE_IDS.get(i, i)} to {principal}" for i in sorted(ids - set(allowed))]
    return problems


def test_roles_are_the_minimal_set(infra: Infra) -> None:
    assert check_role_grants(infra) == []
    granted = {(p, i) for _n, p, _k, ids in role_grants(infra) for i in ids}
    assert {i for p, i in granted if p == "principalId"} == set(ROLE_IDS)
    assert {i for p, i in granted if p == "operatorPrincipalId"} == set(OPERATOR_ROLE_IDS)
    sources = bicep_sources()
    for path, text in sources.items():
        for role_id, role in BROAD_ROLE_IDS.items():
            if role_id not in OPERATOR_ROLE_IDS:
                assert role_id not in text.lower(), f"{path} grants {role}"
    assignments = infra.resources_of("Microsoft.Authorization/roleAssignments")
    assert assignments and {f.path for f, _r in assignments} == {RBAC_FILE}, "one RBAC module owns every assignment"


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' //",
     "  storageBlobDataOwner: 'b24988ac-6180-42a0-ab88-20f7382dd24c' //", "Contributor to principalId"),
    ("      principalId: operatorPrincipalId\n      principalType: operatorPrincipalType\n    }\n  }\n]",
     "      principalId: operatorPrincipalId\n      principalType: 'User'\n    }\n  }\n]",
     "operatorPrincipalType parameter"),
    ("    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
     "operatorRoles.keyVaultSecretsOfficer)\n    principalId: operatorPrincipalId",
     "    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
     "operatorRoles.keyVaultSecretsOfficer)\n    principalId: principalId\n    principalType: 'ServicePrincipal'\n"
     "    principalType2: operatorPrincipalType", "Key Vault Secrets Officer to principalId"),
])
def test_role_check_reports_a_broader_grant(old: str, new: str, expected: str) -> None:
    problems = check_role_grants(mutate(RBAC_FILE, old, new))
    assert len(problems) == 1 and expected in problems[0], problems


def test_operator_roles_follow_the_deployer(infra: Infra) -> None:
    default = infra.main.params["principalId"]
    assert default is not None and _text(default) == "deployer().objectId"
    params = json.loads(PARAMETERS_JSON.read_text(encoding="utf-8"))["parameters"]
    assert params["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"
    caller = infra.caller_argument(RBAC_FILE, "operatorPrincipalId")
    assert caller is not None and _text(caller[1]) == "principalId"
    [(f, _officer)] = [(f, r) for f, r in infra.resources_of("Microsoft.Authorization/roleAssignments")
                       if r.symbol == "operatorSecretsOfficer"]
    assert "if (!empty(operatorPrincipalId))" in _text(f.root)  # no operator, no assignment


# ---------------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------------


def _all_infra_texts() -> dict[str, str]:
    texts = {f"infra/{k}": v for k, v in bicep_sources().items()}
    for path in _iter_files("*.json"):
        texts[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    texts["azure.yaml"] = AZURE_YAML.read_text(encoding="utf-8")
    return texts


def test_no_secret_looking_literals_in_infra() -> None:
    assert check_no_secret_literals(_all_infra_texts()) == []


@pytest.mark.parametrize("literal", [
    "var c = 'DefaultEndpointsProtocol=https;AccountName=st1;AccountKey=abcd'",
    "var k = 'Xy78Q~" + "a" * 32 + "'",
    "var u = 'https://func.example.net/api/graph?code=" + "k" * 20 + "'",
    "var s = stg.listKeys().keys[0].value",
    "var b = '" + "QUJD" * 12 + "'",
])
def test_secret_scan_reports_injected_secrets(literal: str) -> None:
    assert check_no_secret_literals({"x.bicep": f"{literal}\n"}) != []


def test_secure_params_and_outputs(infra: Infra) -> None:
    assert check_secure_params_and_outputs(infra) == []
    secure_main = {n for n, d in infra.main.decorators.items() if "secure" in d}
    assert {"graphClientSecret", "dataverseClientSecret", "webhookFunctionKey"} <= secure_main


def test_secure_check_reports_leaks() -> None:
    mutated = mutate("main.bicep", "output AZURE_LOCATION string = location",
                     "output AZURE_LOCATION string = location\noutput GRAPH_SECRET string = graphClientSecret")
    assert len(check_secure_params_and_outputs(mutated)) == 2  # secret-looking name + secure value
    anchor = "@description('Client secret of the Graph"
    mutated = mutate("main.bicep", "@secure()\n" + anchor, anchor)
    assert check_secure_params_and_outputs(mutated) == [
        "main.bicep: parameter graphClientSecret looks secret but is not @secure()"]


def test_outputs_are_upper_snake_for_azd(infra: Infra) -> None:
    outputs = set(infra.main.outputs)
    assert {"AZURE_LOCATION", "AZURE_FUNCTION_APP_NAME", "AZURE_RESOURCE_GROUP", "WEBHOOK_BASE_URL"} <= outputs
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", o) for o in outputs), outputs


# ---------------------------------------------------------------------------------------------------
# azd: azure.yaml and main.parameters.json
# ---------------------------------------------------------------------------------------------------


def test_azure_yaml_names_the_function_app_service(infra: Infra) -> None:
    doc = yaml.safe_load(AZURE_YAML.read_text(encoding="utf-8"))
    services = doc["services"]
    assert len(services) == 1
    [(name, service)] = services.items()
    assert service["host"] == "function"
    assert service["language"] == "python"
    assert service["project"] in (".", "./")
    assert evaluate(infra.main.variables["serviceName"], infra.main) == name
    assert doc.get("infra", {}).get("path", "infra") == "infra"


def test_parameters_file_matches_main_bicep(infra: Infra) -> None:
    params = json.loads(PARAMETERS_JSON.read_text(encoding="utf-8"))["parameters"]
    assert params["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert params["location"]["value"] == "${AZURE_LOCATION}"
    unknown = set(params) - set(infra.main.params)
    assert not unknown, f"main.parameters.json sets parameters main.bicep doesn't declare: {unknown}"
    required = {name for name, default in infra.main.params.items() if default is None}
    assert required <= set(params), f"azd can't fill {required - set(params)}"
    for name, entry in params.items():
        value = entry.get("value")
        assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(=[^}]*)?\}", value), (
            f"{name}: only azd environment variables here, never literal values")


# ---------------------------------------------------------------------------------------------------
# host.json and requirements.txt (Python v2 programming model)
# ---------------------------------------------------------------------------------------------------


def test_host_json_is_valid_for_the_v2_model(host_json) -> None:
    assert check_host_json(host_json) == []


@pytest.mark.parametrize("patch,expected", [
    ({"version": "1.0"}, "version"),
    ({"extensionBundle": {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[3.*, 4.0.0)"}}, "range"),
    ({"extensions": {"queues": {"batchSize": 64}}}, "batchSize"),
    ({"extensions": {"queues": {"maxDequeueCount": 0}}}, "maxDequeueCount"),
    ({"extensions": {"queues": {"visibilityTimeout": "30s"}}}, "visibilityTimeout"),
    ({"extensions": {"queues": {"messageEncoding": "utf8"}}}, "messageEncoding"),
    ({"extensions": {"queues": {"maxPollingInterval": "00:00:00.05"}}}, "100 ms"),
])
def test_host_json_check_reports_bad_values(host_json, patch: dict[str, Any], expected: str) -> None:
    mutated = json.loads(json.dumps(host_json))
    for key, value in patch.items():
        if key == "extensions":
            mutated["extensions"]["queues"].update(value["queues"])
        else:
            mutated[key] = value
    problems = check_host_json(mutated)
    assert problems and all(expected in p for p in problems), problems


def test_requirements_are_pinned_for_the_v2_model() -> None:
    assert check_requirements(REQUIREMENTS.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("text", [
    "azure-functions>=1.24\n",
    "azure-functions==2.0.0\n",
    "azure-functions==1.24.0\nhttpx\n",
    "azure-functions==1.24.0\nazure-functions-worker==1.0.0\n",
    "httpx==0.28.1\n",
])
def test_requirements_check_reports_loose_pins(text: str) -> None:
    assert check_requirements(text) != []


# ---------------------------------------------------------------------------------------------------
# Docs
# ---------------------------------------------------------------------------------------------------


def test_deploy_doc_tells_to_build_the_bicep_first() -> None:
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    assert "az bicep build" in doc
    assert "azd up" in doc and "az deployment group create" in doc and "func azure functionapp publish" in doc


WALK_THROUGH = ("az login", "azd auth login", "az provider register", "az ad app create", "az ad sp create",
                "New-ManagementRoleAssignment", "azd env new", "azd env set AZURE_LOCATION",
                "azd env set GRAPH_TENANT_ID", "azd env set GRAPH_CLIENT_ID", "azd env set DATAVERSE_URL", "azd up",
                "/api/health", "emailrouter --settings .azure/")


def walk_through_order(markdown: str, commands: Sequence[str]) -> list[str]:
    """Problems with the walk-through: each command named in a numbered step, in this order."""
    if "## Walk-through" not in markdown:
        return ["no '## Walk-through' section"]
    section = markdown.split("## Walk-through", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]  # below the heading
    problems, at = [], 0
    for command in commands:
        found = section.find(f"`{command}", at) if f"`{command}" in section else section.find(command, at)
        if found < 0:
            problems.append(f"walk-through: {command!r} missing or out of order")
        else:
            at = found
    return problems


def test_walk_through_names_each_command_in_order() -> None:
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    assert walk_through_order(doc, WALK_THROUGH) == []
    steps = re.findall(r"^(\d+)\. ", doc.split("## Walk-through", 1)[1].split("\n## ", 1)[0], re.M)
    assert steps == [str(i) for i in range(1, len(steps) + 1)] and len(steps) >= 8
    # every section the walk-through points at exists
    for ref in set(re.findall(r"§(\d+[ab]?(?:\.\d)?)", doc)):
        assert re.search(rf"^##+ {re.escape(ref)}\.? ", doc, re.M), f"§{ref} is referenced but not a heading"
    for hook in ("postprovision", "postdeploy"):
        assert hook in doc


def test_walk_through_check_reports_a_swapped_step() -> None:
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    assert walk_through_order(doc, ("azd up", "azd env new")) == ["walk-through: 'azd env new' missing or out of order"]
    assert walk_through_order("# no walk-through\n", ("azd up",)) != []


# ---------------------------------------------------------------------------------------------------
# Scale, always ready, hardening, alerts
# ---------------------------------------------------------------------------------------------------


def _main_default(infra: Infra, name: str) -> Any:
    default = infra.main.params[name]
    assert default is not None, f"{name} has no default"
    return evaluate(default, infra.main)


def azure_host_json(infra: Infra, host_json: Mapping[str, Any]) -> dict[str, Any]:
    """host.json as the deployed app runs it: the template's ``AzureFunctionsJobHost__extensions__queues__*`` app
    settings override host.json's values (main.bicep parameter defaults)."""
    settings = infra.app_settings()
    effective = json.loads(json.dumps(host_json))
    queues = effective.setdefault("extensions", {}).setdefault("queues", {})
    for key, param in (("batchSize", "queueBatchSize"), ("newBatchThreshold", "queueNewBatchThreshold")):
        name = f"AzureFunctionsJobHost__extensions__queues__{key}"
        assert name in settings, f"{APP_SETTINGS_FILE} must set {name} (Azure's per-instance concurrency)"
        queues[key] = int(_main_default(infra, param))
    return effective


def test_scale_cap_respects_dataverse_with_the_deployed_batch_sizes(infra: Infra, host_json) -> None:
    import function_app

    decorators = re.search(r"@minValue\((\d+)\)\s*@maxValue\((\d+)\)\s*@description\([^\n]*\)\s*param "
                           r"maximumInstanceCount", bicep_sources()["main.bicep"])
    assert decorators and decorators.groups() == ("1", "1000"), "Flex allows 1..1000"
    groups = scale_groups(function_app.app)
    assert groups == 9, "the HTTP group, 3 queue functions, 5 timers: docs/deploy.md and main.bicep say 9"
    maximum, ready = _main_default(infra, "maximumInstanceCount"), _main_default(infra, "httpAlwaysReady")
    deployed = azure_host_json(infra, host_json)
    assert check_scale_budget(maximum, ready, deployed, groups) == []  # the default: one application user
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    queues = deployed["extensions"]["queues"]
    per_instance = queues["batchSize"] + queues["newBatchThreshold"]
    arithmetic = f"({maximum} − {ready}) × {per_instance} + {DATAVERSE_TIMERS_AND_CLI} = "
    assert arithmetic in doc, f"docs/deploy.md must show the arithmetic: {arithmetic}..."
    local = host_json["extensions"]["queues"]
    assert f"`batchSize` {local['batchSize']} and `newBatchThreshold` {local['newBatchThreshold']}" in doc, \
        "docs/deploy.md §9 must say what host.json (the local stack) uses"
    # With K application users the limit is K x 52: the cap the docs give for K = 3 must hold
    assert check_scale_budget(26, ready, deployed, groups, application_users=3) == []
    assert check_scale_budget(27, ready, deployed, groups, application_users=3) != []


@pytest.mark.parametrize(("maximum", "batch", "threshold", "groups"), [
    (9, 16, 8, 9),   # the old host.json: 8 x 24 + 4 = 196
    (40, 4, 2, 9),   # the old cap: 39 x 6 + 4 = 238
    (5, 4, 2, 9),    # fewer instances than scale groups
])
def test_scale_check_reports_an_unsafe_combination(maximum: int, batch: int, threshold: int, groups: int) -> None:
    host = {"extensions": {"queues": {"batchSize": batch, "newBatchThreshold": threshold}}}
    assert check_scale_budget(maximum, 1, host, groups) != []


def test_http_group_is_always_ready(infra: Infra) -> None:
    [(f, site)] = [(f, r) for f, r in infra.resources_of("Microsoft.Web/sites") if not r.existing]
    node = get_property(site.body, "properties.functionAppConfig.scaleAndConcurrency.alwaysReady", f)
    assert node is not None
    text = _text(node)
    assert "name: 'http'" in text and "instanceCount: httpAlwaysReady" in text
    assert _main_default(infra, "httpAlwaysReady") == 1
    caller = infra.caller_argument(f.path, "httpAlwaysReady")
    assert caller is not None and _text(caller[1]) == "httpAlwaysReady"


def test_hardening_defaults(infra: Infra) -> None:
    assert _main_default(infra, "keyVaultPurgeProtection") is True
    assert _main_default(infra, "appCredential") == "managedIdentity"
    assert "azd: {\n    type: 'location'" in bicep_sources()["main.bicep"]  # azd prompts with a region picker
    [(f, vault)] = [(f, r) for f, r in infra.resources_of("Microsoft.KeyVault/vaults") if not r.existing]
    assert _text(get_property(vault.body, "properties.enablePurgeProtection", f)).startswith("purgeProtection")  # type: ignore[arg-type]
    appsettings = bicep_sources()[APP_SETTINGS_FILE]
    assert "login.microsoftonline.com" not in appsettings, "no-hardcoded-env-urls: main.bicep passes environment()"


def test_poison_queue_alert(infra: Infra) -> None:
    [(f, rule)] = infra.resources_of("Microsoft.Insights/scheduledQueryRules")
    query = str(evaluate(get_property(rule.body, "properties.criteria.allOf", f).named_children[0]  # type: ignore[union-attr]
                         .named_children[0].named_children[-1], f))
    # the Functions host's own line (as the local host mimics it) and the router's
    assert "Moving message to queue" in query and "moving to poison" in query
    from core.services import inbound

    assert "moving to poison" in Path(inbound.__file__).read_text(encoding="utf-8")
    local_host = (ROOT / "local" / "host" / "queues.py").read_text(encoding="utf-8")
    assert "Moving message to queue" in local_host
    assert "alertEmail" in infra.main.params


# ---------------------------------------------------------------------------------------------------
# What is deployed: .funcignore and requirements.txt
# ---------------------------------------------------------------------------------------------------


def funcignore_patterns() -> list[str]:
    lines = (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(relative: str, patterns: Sequence[str]) -> bool:
    """gitignore-style, as far as .funcignore uses it: 'dir/' = a directory, globs match any path component."""
    import fnmatch

    parts = relative.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            prefix = pattern.rstrip("/").split("/")
            if parts[:len(prefix)] == prefix and len(parts) > len(prefix):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def deployed_python_files(patterns: Sequence[str]) -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if not is_ignored(relative, patterns):
            files.append(path)
    return files


def _top_level_imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@functools.cache
def _file_owners() -> dict[str, str]:
    """Installed file -> its distribution (normalised name)."""
    import importlib.metadata

    owners = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"].lower())
        for file in dist.files or ():
            if str(file).endswith(".py"):
                owners[str(Path(str(dist.locate_file(file))).resolve())] = name
    return owners


def _distribution_of(module: str) -> str | None:
    """The installed distribution that provides ``module`` (by the file it loads from, so namespace packages such
    as ``azure.*`` resolve to azure-core, azure-data-tables, ...)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    return _file_owners().get(str(Path(spec.origin).resolve()))


def check_runtime_requirements(files: Sequence[Path], requirements: str) -> list[str]:
    import sys

    pinned = {re.sub(r"[-_.]+", "-", line.split("==")[0].strip().lower())
              for line in requirements.splitlines() if "==" in line and not line.lstrip().startswith("#")}
    local = {"core", "functions", "function_app"}
    used: dict[str, str] = {}
    for path in files:
        for name in _top_level_imports(path):
            top = name.split(".")[0]
            if top in local or top in sys.stdlib_module_names:
                continue
            used.setdefault(name, path.relative_to(ROOT).as_posix())
    problems = []
    provided: set[str] = set()
    for module, where in sorted(used.items()):
        dist = _distribution_of(module)
        if dist is None:
            problems.append(f"{where} imports {module}, which no installed distribution provides")
            continue
        provided.add(dist)
        if dist not in pinned and not _required_by(dist, pinned):
            problems.append(f"{where} imports {module} ({dist}) but requirements.txt does not pin it")
    for dist in sorted(pinned - provided):
        problems.append(f"requirements.txt pins {dist}, which no deployed file imports (requirements-dev.txt?)")
    return problems


def _required_by(dist: str, pinned: set[str]) -> bool:
    """``dist`` comes with a pinned distribution (e.g. kiota and msgraph-core with msgraph-sdk)."""
    import importlib.metadata

    seen, todo = set(), list(pinned)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            todo.append(re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()))
    return dist in seen


def test_funcignore_ships_the_app_and_nothing_else() -> None:
    patterns = funcignore_patterns()
    for shipped in ("function_app.py", "host.json", "requirements.txt", "functions/health.py",
                    "core/config.py", "core/adapters/auth.py"):
        assert not is_ignored(shipped, patterns), shipped
    for left_out in ("tests/unit/test_infra.py", "emulators/identity/app.py", "local/stack.py", "infra/main.bicep",
                     "core/cli/commands.py", "docs/deploy.md", "README.md", "pyproject.toml", "bench/metrics.py",
                     "requirements-dev.txt", "local.settings.json", "local.settings.example.json",
                     "email_router_d365.egg-info/PKG-INFO", ".azure/prod/.env", "infra/hooks/azd_hooks.py"):
        assert is_ignored(left_out, patterns), left_out


def test_requirements_hold_exactly_what_the_deployed_code_imports() -> None:
    files = deployed_python_files(funcignore_patterns())
    assert any(p.name == "function_app.py" for p in files) and not any("tests" in p.parts for p in files)
    assert check_runtime_requirements(files, REQUIREMENTS.read_text(encoding="utf-8")) == []


def test_requirements_check_reports_both_directions() -> None:
    files = deployed_python_files(funcignore_patterns())
    text = REQUIREMENTS.read_text(encoding="utf-8")
    problems = check_runtime_requirements(files, text.replace("nh3==", "# nh3=="))
    assert problems == [p for p in problems if "nh3" in p] and problems, problems
    problems = check_runtime_requirements(files, text + "croniter==7.0.0\n")
    assert problems == ["requirements.txt pins croniter, which no deployed file imports (requirements-dev.txt?)"]
    cli = deployed_python_files([p for p in funcignore_patterns() if p != "core/cli/"])
    assert any("rich" in p for p in check_runtime_requirements(cli, text))  # the CLI would ship without rich


def test_local_settings_example_runs_under_core_tools() -> None:
    doc = json.loads((ROOT / "local.settings.example.json").read_text(encoding="utf-8"))
    assert doc["IsEncrypted"] is False
    values = doc["Values"]
    known = {s.name: s for s in config.SETTINGS}
    assert values.pop("FUNCTIONS_WORKER_RUNTIME") == "python"  # Core Tools needs it locally (Flex: never in Azure)
    assert set(values) <= set(known), set(values) - set(known)
    assert {s.name for s in config.SETTINGS if s.required} <= set(values)
    for name, spec in known.items():
        if name.endswith("_SCHEDULE"):  # timer bindings resolve %NAME% at start-up: the setting must exist
            assert values.get(name) == spec.default, name
    for name, value in values.items():
        if known[name].secret and name != "AzureWebJobsStorage":
            assert value == "", f"{name}: placeholders only, never a value"
    assert "local.settings.json" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "local.settings.example.json" in readme and "func start" in readme
