"""Reads the org's names (:class:`core.domain.org_schema.OrgSchema`) from Dataverse metadata, and caches them.

Two ``$batch`` requests of GETs. The first:

* ``EntityDefinitions?$select=LogicalName,EntitySetName,IsOptimisticConcurrencyEnabled,IsActivityParty,...`` for
  every table's entity set name (never guessed as ``<logical>s``: a correlated email's regarding can be any table,
  custom ones included), whether optimistic concurrency is on, and whether it is email-enabled (``IsActivityParty``:
  "email messages can be sent to an email address stored in a record of this type");
* ``EntityDefinitions(LogicalName='<t>')/ManyToOneRelationships?$select=SchemaName,ReferencingAttribute,
  ReferencedEntity,ReferencingEntityNavigationPropertyName&$filter=ReferencingAttribute eq ...`` for each table the
  router binds on (email, activityparty, activitymimeattachment, contact).

The second, for each email-enabled table (at most :data:`MAX_EMAIL_TABLES`): its string attributes
(``.../Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata?$select=LogicalName,FormatName``; the Email-format
ones are the addresses a row is found by) and its state attribute (``StateAttributeMetadata``: whether rows have a
``statecode``). Filter 3 ("email-enabled records") and party resolution search exactly these tables.

The result is cached per process (``ttl`` seconds, default one hour) and refreshed with the CRM sync. If the read
fails, the last good schema is kept; before the first success the documented names are used (logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, Protocol

from core.adapters.dataverse import DataverseError, map_error
from core.adapters.odata import BatchRequest, BatchResponse, build_query
from core.domain.org_schema import (
    BINDS,
    DOCUMENTED,
    RELATIONSHIP_TABLES,
    EmailEnabledTable,
    OrgSchema,
    Relationship,
)

__all__ = ["OrgSchemaCache", "OrgSchemaSource", "org_schema_for", "read_org_schema", "schema_requests"]

log = logging.getLogger("emailrouter.crm.schema")

_RELATIONSHIP_SELECT: Final = ("SchemaName", "ReferencingAttribute", "ReferencedEntity",
                               "ReferencingEntityNavigationPropertyName")
_DEFINITION_SELECT: Final = ("LogicalName", "EntitySetName", "IsOptimisticConcurrencyEnabled", "IsActivityParty",
                             "PrimaryIdAttribute", "PrimaryNameAttribute", "OwnershipType")
# Bounds on what party resolution searches: each table is one GET in a lookup's $batch, each column one condition.
MAX_EMAIL_TABLES: Final = 25
MAX_EMAIL_COLUMNS: Final = 5
_OWNED: Final = frozenset({"UserOwned", "TeamOwned"})


class _BatchClient(Protocol):
    async def execute_batch(self, requests: Sequence[Any], *, continue_on_error: bool = ...) -> list[BatchResponse]:
        ...


class OrgSchemaSource(Protocol):
    async def get(self) -> OrgSchema: ...


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def schema_requests() -> list[BatchRequest]:
    """The GETs (in order: entity definitions, then one per relationship table). Pure."""
    requests = [BatchRequest("GET", "EntityDefinitions?" + build_query(select=_DEFINITION_SELECT))]
    for table in RELATIONSHIP_TABLES:
        attributes = sorted({b.attribute for b in BINDS if b.entity == table})
        condition = " or ".join(f"ReferencingAttribute eq {_quoted(a)}" for a in attributes)
        requests.append(BatchRequest("GET", f"EntityDefinitions(LogicalName={_quoted(table)})/ManyToOneRelationships?"
                                     + build_query(select=_RELATIONSHIP_SELECT, filter=condition)))
    return requests


def parse_schema(responses: Sequence[BatchResponse]) -> OrgSchema:
    """Responses of :func:`schema_requests` -> :class:`OrgSchema`. Pure (unit-tested)."""
    for response in responses:
        if not response.ok:
            raise map_error(response.status, response.body, response.headers)
    definitions = (responses[0].json() or {}).get("value", [])
    entity_sets = {str(d["LogicalName"]): str(d["EntitySetName"]) for d in definitions
                   if d.get("LogicalName") and d.get("EntitySetName")}
    concurrency = {str(d["LogicalName"]): bool(d.get("IsOptimisticConcurrencyEnabled")) for d in definitions
                   if d.get("LogicalName") and "IsOptimisticConcurrencyEnabled" in d}
    relationships: dict[str, tuple[Relationship, ...]] = {}
    for table, response in zip(RELATIONSHIP_TABLES, responses[1:], strict=True):
        rows = (response.json() or {}).get("value", [])
        relationships[table] = tuple(
            Relationship(str(r.get("SchemaName", "")), str(r["ReferencingAttribute"]),
                         str(r["ReferencedEntity"]), str(r["ReferencingEntityNavigationPropertyName"]))
            for r in rows
            if r.get("ReferencingAttribute") and r.get("ReferencedEntity")
            and r.get("ReferencingEntityNavigationPropertyName"))
    return OrgSchema(entity_sets=entity_sets, relationships=relationships, optimistic_concurrency=concurrency,
                     from_org=True)


def email_table_candidates(responses: Sequence[BatchResponse]) -> list[dict[str, Any]]:
    """The email-enabled tables of the first round's EntityDefinitions answer (logical name order), bounded. Pure."""
    rows = (responses[0].json() or {}).get("value", []) if responses and responses[0].ok else []
    found = sorted((d for d in rows if d.get("IsActivityParty") is True and d.get("LogicalName")
                    and d.get("EntitySetName") and d.get("PrimaryIdAttribute")),
                   key=lambda d: str(d["LogicalName"]))
    if len(found) > MAX_EMAIL_TABLES:
        log.warning("the org has %d email-enabled tables; addresses are resolved in the first %d (by name)",
                    len(found), MAX_EMAIL_TABLES)
    return found[:MAX_EMAIL_TABLES]


def email_table_requests(candidates: Sequence[Mapping[str, Any]]) -> list[BatchRequest]:
    """Two GETs per email-enabled table: its string attributes with their format, its state attribute. Pure."""
    out: list[BatchRequest] = []
    for d in candidates:
        base = f"EntityDefinitions(LogicalName={_quoted(str(d['LogicalName']))})/Attributes/Microsoft.Dynamics.CRM."
        out.append(BatchRequest("GET", base + "StringAttributeMetadata?" + build_query(
            select=("LogicalName", "FormatName"))))
        out.append(BatchRequest("GET", base + "StateAttributeMetadata?" + build_query(select=("LogicalName",))))
    return out


def parse_email_tables(candidates: Sequence[Mapping[str, Any]], responses: Sequence[BatchResponse]
                       ) -> tuple[EmailEnabledTable, ...]:
    """Responses of :func:`email_table_requests` -> the tables with at least one Email-format column. Pure. A table
    whose attributes could not be read is left out (logged): the rest still resolve."""
    out: list[EmailEnabledTable] = []
    for n, d in enumerate(candidates):
        strings, states = responses[2 * n], responses[2 * n + 1]
        name = str(d["LogicalName"])
        if not strings.ok or not states.ok:
            log.warning("org schema: attributes of email-enabled table %s not readable (%s); not searched", name,
                        strings.status if not strings.ok else states.status)
            continue
        columns = sorted(str(a["LogicalName"]) for a in (strings.json() or {}).get("value", [])
                         if a.get("LogicalName") and str((a.get("FormatName") or {}).get("Value", "")) == "Email")
        if not columns:
            continue
        has_state = any(str(a.get("LogicalName")) == "statecode" for a in (states.json() or {}).get("value", []))
        out.append(EmailEnabledTable(
            logical_name=name, entity_set=str(d["EntitySetName"]), primary_id=str(d["PrimaryIdAttribute"]),
            primary_name=str(d.get("PrimaryNameAttribute") or d["PrimaryIdAttribute"]),
            email_columns=tuple(columns[:MAX_EMAIL_COLUMNS]),
            owned=str(d.get("OwnershipType") or "") in _OWNED, has_state=has_state))
    return tuple(out)


async def read_org_schema(client: _BatchClient) -> OrgSchema:
    first = await client.execute_batch(schema_requests(), continue_on_error=True)
    schema = parse_schema(first)
    candidates = email_table_candidates(first)
    if not candidates:
        return schema
    second = await client.execute_batch(email_table_requests(candidates), continue_on_error=True)
    return replace(schema, email_enabled=parse_email_tables(candidates, second))


def describe_missing(schema: OrgSchema) -> list[str]:
    """Human-readable findings: the router's binds the org declares no navigation property for."""
    return [f"{w.entity}.{w.attribute} -> {w.target} ({w.purpose}): no declared navigation property, not bound"
            for w in schema.missing()]


class OrgSchemaCache:
    """Process-wide cache of the org's schema (one metadata ``$batch`` per ``ttl``)."""

    def __init__(self, client: _BatchClient, *, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._schema: OrgSchema | None = None
        self._expires = 0.0
        self._lock: asyncio.Lock | None = None  # created in the running loop; one read for concurrent callers
        self.reads = 0

    @property
    def current(self) -> OrgSchema:
        return self._schema or DOCUMENTED

    async def get(self) -> OrgSchema:
        if self._schema is None or self._clock() >= self._expires:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._schema is None or self._clock() >= self._expires:  # another caller may have read it
                    await self.refresh()
        return self.current

    async def refresh(self) -> OrgSchema:
        self.reads += 1
        try:
            schema = await read_org_schema(self._client)
        except DataverseError as exc:
            if self._schema is None:
                log.warning("could not read the org's metadata (%s); using the documented names until it can",
                            exc)
            else:
                log.warning("could not refresh the org's metadata (%s); keeping the last read", exc)
            self._expires = self._clock() + min(self._ttl, 60.0)
            return self.current
        changed = self._schema is None or _names(schema) != _names(self._schema)
        self._schema = schema
        self._expires = self._clock() + self._ttl
        if changed:
            if schema.email_enabled:
                log.info("org schema: addresses resolve in the email-enabled tables %s",
                         ", ".join(t.logical_name for t in schema.email_enabled))
            for finding in describe_missing(schema):
                log.warning("org schema: %s", finding)
            if schema.concurrency_enabled("email") is False:
                log.warning("org schema: optimistic concurrency is off on email")
        return schema


def _names(schema: OrgSchema) -> tuple[Any, ...]:
    return schema.entity_sets, schema.relationships, schema.email_enabled


_CACHES: weakref.WeakKeyDictionary[Any, OrgSchemaCache] = weakref.WeakKeyDictionary()


def org_schema_for(container: Any) -> OrgSchemaCache:
    """The process-wide schema cache of a container (shared by the pipelines and refreshed by the CRM sync)."""
    cache = _CACHES.get(container)
    if cache is None:
        cache = _CACHES[container] = OrgSchemaCache(container.dataverse)
    return cache
