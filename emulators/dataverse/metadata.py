"""Metadata endpoints: service document, ``$metadata`` CSDL and ``EntityDefinitions`` (+ ``Attributes``).

Generic clients (the Power Platform Python SDK, OData tooling) discover entity set names and primary keys through
``EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute&$filter=LogicalName eq 'contact'`` and read
picklist options through
``EntityDefinitions(LogicalName='x')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata``.
Everything is generated from ``schema.py``.
"""

from __future__ import annotations

import json
import uuid
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from .errors import DataverseError
from .odata import And, Cmp, Func, In, Lambda, Literal, Node, Not, Or, Prop, parse_expand, parse_filter, parse_select
from .schema import (
    BOOL,
    DATETIME,
    DECIMAL,
    EDM_TYPES,
    ENTITIES,
    GUID,
    INT,
    LOOKUP,
    MEMO,
    MONEY,
    OPTIONSET,
    STATE,
    STATUS,
    STRING,
    Column,
    EntityDef,
)

if TYPE_CHECKING:
    from .service import ApiRequest, ApiResponse, OrgVariant

__all__ = ["attribute_metadata", "csdl_response", "entity_definitions", "entity_metadata", "service_document"]

_ATTR_TYPES = {
    STRING: ("String", "StringType", "StringAttributeMetadata"), MEMO: ("Memo", "MemoType", "MemoAttributeMetadata"),
    INT: ("Integer", "IntegerType", "IntegerAttributeMetadata"),
    BOOL: ("Boolean", "BooleanType", "BooleanAttributeMetadata"),
    DATETIME: ("DateTime", "DateTimeType", "DateTimeAttributeMetadata"),
    DECIMAL: ("Decimal", "DecimalType", "DecimalAttributeMetadata"),
    MONEY: ("Money", "MoneyType", "MoneyAttributeMetadata"),
    GUID: ("Uniqueidentifier", "UniqueidentifierType", "AttributeMetadata"),
    OPTIONSET: ("Picklist", "PicklistType", "PicklistAttributeMetadata"),
    STATE: ("State", "StateType", "StateAttributeMetadata"),
    STATUS: ("Status", "StatusType", "StatusAttributeMetadata"),
    LOOKUP: ("Lookup", "LookupType", "LookupAttributeMetadata"),
}


def _label(text: str) -> dict[str, Any]:
    loc = {"Label": text, "LanguageCode": 1033, "IsManaged": True}
    return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}


def _schema_name(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def attribute_metadata(ent: EntityDef, col: Column) -> dict[str, Any]:
    attr_type, type_name, odata_type = _ATTR_TYPES.get(col.type, ("String", "StringType", "StringAttributeMetadata"))
    if col.attribute_type and col.attribute_type != attr_type:
        # The reference's own AttributeType (Owner, Customer, EntityName, BigInt, Double ...).
        attr_type, type_name = col.attribute_type, f"{col.attribute_type}Type"
    elif col.type == LOOKUP and col.name == "ownerid":
        attr_type, type_name = "Owner", "OwnerType"
    elif col.type == LOOKUP and len(col.targets) > 1:
        attr_type, type_name = "Customer" if set(col.targets) == {"account", "contact"} else "Lookup", type_name
    md: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{odata_type}",
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/attr/{ent.logical_name}/{col.name}")),
        "LogicalName": col.name, "SchemaName": col.schema_name or _schema_name(col.name),
        "EntityLogicalName": ent.logical_name,
        "AttributeType": attr_type, "AttributeTypeName": {"Value": type_name},
        "IsPrimaryId": col.name == ent.primary_id, "IsPrimaryName": col.name == ent.primary_name,
        "IsValidForCreate": col.valid_for_create,
        "IsValidForUpdate": col.valid_for_update and (col.name != ent.primary_id or ent.source is not None),
        "IsValidForRead": True, "IsCustomAttribute": False, "IsLogical": False,
        "IsValidForAdvancedFind": {"Value": col.filterable, "CanBeChanged": False},
        "DisplayName": _label(col.name), "AttributeOf": None,
    }
    if col.max_length is not None:
        md["MaxLength"] = col.max_length
    if col.type in (STRING, MEMO) and md["@odata.type"].endswith(("StringAttributeMetadata", "MemoAttributeMetadata")):
        md["FormatName"] = {"Value": col.format_name or "Text"}
    if col.min_value is not None:
        md["MinValue"] = col.min_value
    if col.max_value is not None:
        md["MaxValue"] = col.max_value
    if col.type == LOOKUP:
        md["Targets"] = list(col.targets)
    if col.options:
        md["OptionSet"] = {
            "Name": f"{ent.logical_name}_{col.name}", "IsGlobal": False,
            "Options": [{"Value": v, "Label": _label(lbl)} for v, lbl in col.options.items()],
        }
    return md


@lru_cache(maxsize=1)
def _activity_parties() -> frozenset[str]:
    """IsActivityParty ("email messages can be sent to an email address stored in a record of this type"), derived
    from the schema data: a table an activity party can point at (activityparty.partyid's Targets, from the
    Dataverse and Dynamics 365 reference pages) that has a string column of format Email. The targets alone are
    wider (incident and opportunity are parties as "regarding"/"customer", with no address to send to)."""
    party = ENTITIES.get("activityparty")
    column = party.columns.get("partyid") if party is not None else None
    return frozenset(t for t in (column.targets if column is not None else ()) if t in ENTITIES and any(
        c.type == STRING and c.format_name == "Email" for c in ENTITIES[t].columns.values()))


def entity_metadata(ent: EntityDef, variant: OrgVariant | None = None) -> dict[str, Any]:
    return {
        "MetadataId": ent.metadata_id, "LogicalName": ent.logical_name, "SchemaName": ent.schema_name,
        "EntitySetName": ent.entity_set, "LogicalCollectionName": ent.entity_set,
        "CollectionSchemaName": ent.entity_set.capitalize(), "PrimaryIdAttribute": ent.primary_id,
        "PrimaryNameAttribute": ent.primary_name, "ObjectTypeCode": ent.object_type_code,
        "OwnershipType": ent.ownership if ent.ownership != "None" else "None",
        "IsActivity": ent.is_activity, "IsActivityParty": ent.logical_name in _activity_parties(),
        "IsCustomEntity": False, "IsManaged": True,
        "IsOptimisticConcurrencyEnabled": variant is None or ent.logical_name not in variant.concurrency_off,
        "IsValidForAdvancedFind": True, "TableType": "Standard",
        "DisplayName": _label(ent.logical_name), "DisplayCollectionName": _label(ent.entity_set),
    }


def many_to_one_metadata(ent: EntityDef, variant: OrgVariant | None = None) -> list[dict[str, Any]]:
    """``EntityDefinitions(...)/ManyToOneRelationships``: OneToManyRelationshipMetadata seen from the referencing
    side, with the exact ``ReferencingEntityNavigationPropertyName`` the org declares."""
    rels = variant.many_to_one(ent) if variant is not None else ent.many_to_one
    return [{
        "@odata.type": "#Microsoft.Dynamics.CRM.OneToManyRelationshipMetadata",
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/rel/{r['schema_name']}")),
        "SchemaName": r["schema_name"], "RelationshipType": "OneToManyRelationship",
        "ReferencedEntity": r["referenced_entity"], "ReferencedAttribute": r["referenced_attribute"],
        "ReferencingEntity": ent.logical_name, "ReferencingAttribute": r["referencing_attribute"],
        "ReferencingEntityNavigationPropertyName": r["navigation_property"],
        "IsCustomRelationship": False, "IsManaged": True,
    } for r in rels]


def one_to_many_metadata(ent: EntityDef) -> list[dict[str, Any]]:
    return [{
        "@odata.type": "#Microsoft.Dynamics.CRM.OneToManyRelationshipMetadata",
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/rel/{n.name}")),
        "SchemaName": n.name, "RelationshipType": "OneToManyRelationship",
        "ReferencedEntity": ent.logical_name, "ReferencedAttribute": ent.primary_id,
        "ReferencingEntity": n.target, "ReferencingAttribute": n.fk,
        "ReferencedEntityNavigationPropertyName": n.name, "IsCustomRelationship": False, "IsManaged": True,
    } for n in ent.collections.values()]


_RELATIONSHIP_NAVS = ("ManyToOneRelationships", "OneToManyRelationships")


def _relationships(ent: EntityDef, nav: str, variant: OrgVariant | None) -> list[dict[str, Any]]:
    return many_to_one_metadata(ent, variant) if nav == "ManyToOneRelationships" else one_to_many_metadata(ent)


def _filtered(items: list[dict[str, Any]], options: dict[str, str]) -> list[dict[str, Any]]:
    if options.get("$filter"):
        node = parse_filter(options["$filter"])
        items = [i for i in items if _evaluate(node, i)]
    select = parse_select(options.get("$select"))
    return [_project(i, select) for i in items]


def _evaluate(node: Node, item: dict[str, Any]) -> Any:
    """Tiny evaluator for ``$filter`` over metadata dictionaries (string comparisons case-insensitive)."""
    def val(n: Node) -> Any:
        if isinstance(n, Literal):
            return n.value
        if isinstance(n, Prop):
            return item.get(n.path[-1])
        return _evaluate(n, item)

    def norm(v: Any) -> Any:
        return v.casefold() if isinstance(v, str) else v

    if isinstance(node, And):
        return bool(_evaluate(node.left, item)) and bool(_evaluate(node.right, item))
    if isinstance(node, Or):
        return bool(_evaluate(node.left, item)) or bool(_evaluate(node.right, item))
    if isinstance(node, Not):
        return not _evaluate(node.expr, item)
    if isinstance(node, Cmp):
        a, b = norm(val(node.left)), norm(val(node.right))
        if node.op == "eq":
            return a == b
        if node.op == "ne":
            return a != b
        if a is None or b is None:
            return False
        return {"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[node.op]
    if isinstance(node, Func) and node.name in ("contains", "startswith", "endswith"):
        a, b = norm(val(node.args[0])), norm(val(node.args[1]))
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        return {"contains": b in a, "startswith": a.startswith(b), "endswith": a.endswith(b)}[node.name]
    if isinstance(node, In):
        return norm(item.get(node.prop.path[-1])) in {norm(v.value) for v in node.values}
    if isinstance(node, Lambda):
        raise DataverseError.bad_request("Lambda operators are not supported on metadata.")
    return val(node)


def _project(item: dict[str, Any], select: list[str] | None, keep: str = "MetadataId") -> dict[str, Any]:
    if select is None:
        return item
    out = {k: item[k] for k in select if k in item}
    out[keep] = item[keep]
    if "@odata.type" in item:
        out = {"@odata.type": item["@odata.type"], **out}
    return out


def _find_entity(key: str) -> EntityDef:
    key = key.strip()
    if key.startswith("LogicalName="):
        name = key.split("=", 1)[1].strip().strip("'")
        ent = ENTITIES.get(name)
    else:
        ent = next((e for e in ENTITIES.values() if e.metadata_id == key.lower()), None)
    if ent is None:
        raise DataverseError(404, "0x80040217", f"Could not find entity with key '{key}'.")
    return ent


def entity_definitions(req: ApiRequest, key: str | None, rest: list[str], variant: OrgVariant | None = None
                       ) -> ApiResponse:
    from .service import ApiResponse

    params = req.params
    select = parse_select(params.get("$select"))
    expand = parse_expand(params.get("$expand"))
    base = f"{req.api_url}/$metadata#EntityDefinitions"

    def with_expands(ent: EntityDef, body: dict[str, Any]) -> dict[str, Any]:
        for item in expand:
            if item.nav == "Attributes":
                body["Attributes"] = _filtered([attribute_metadata(ent, c) for c in ent.columns.values()],
                                               item.options)
            elif item.nav in _RELATIONSHIP_NAVS:
                body[item.nav] = _filtered(_relationships(ent, item.nav, variant), item.options)
            else:
                raise DataverseError.unknown_property(item.nav, "EntityMetadata")
        return body

    if key is None:
        pairs = [(e, entity_metadata(e, variant)) for e in ENTITIES.values()]
        if params.get("$filter"):
            node = parse_filter(params["$filter"])
            pairs = [(e, i) for e, i in pairs if _evaluate(node, i)]
        return ApiResponse.json(200, {"@odata.context": base,
                                      "value": [with_expands(e, _project(i, select)) for e, i in pairs]})
    ent = _find_entity(key)
    if not rest:
        body = with_expands(ent, _project(entity_metadata(ent, variant), select))
        return ApiResponse.json(200, {"@odata.context": f"{base}/$entity", **body})
    if rest[0] in _RELATIONSHIP_NAVS:
        items = _filtered(_relationships(ent, rest[0], variant), params)
        return ApiResponse.json(200, {"@odata.context": f"{base}({ent.metadata_id})/{rest[0]}", "value": items})
    seg = rest[0]
    if seg.startswith("Attributes"):
        attrs = [attribute_metadata(ent, c) for c in ent.columns.values()]
        inner = seg[len("Attributes"):]
        if inner.startswith("(") and inner.endswith(")"):
            k = inner[1:-1]
            name = k.split("=", 1)[1].strip().strip("'") if k.startswith("LogicalName=") else None
            match = [a for a in attrs if (a["LogicalName"] == name if name else a["MetadataId"] == k.lower())]
            if not match:
                raise DataverseError(404, "0x80040217", f"Could not find attribute with key '{k}'.")
            return ApiResponse.json(200, {"@odata.context": f"{base}/Attributes/$entity", **_project(match[0], select)})
        if len(rest) > 1:
            cast = rest[1].rsplit(".", 1)[-1]
            attrs = [a for a in attrs if a["@odata.type"].endswith("." + cast)]
        if params.get("$filter"):
            node = parse_filter(params["$filter"])
            attrs = [a for a in attrs if _evaluate(node, a)]
        expand = parse_expand(params.get("$expand"))
        keep_optionset = any(x.nav == "OptionSet" for x in expand)
        out = []
        for a in attrs:
            p = _project(a, select)
            if keep_optionset and "OptionSet" in a:
                p["OptionSet"] = a["OptionSet"]
            out.append(p)
        return ApiResponse.json(200, {"@odata.context": f"{base}/Attributes", "value": out})
    if seg == "Keys":
        return ApiResponse.json(200, {"@odata.context": f"{base}/Keys", "value": []})
    raise DataverseError.resource_not_found(seg)


def service_document(req: ApiRequest) -> ApiResponse:
    from .service import ApiResponse

    return ApiResponse.json(200, {
        "@odata.context": f"{req.api_url}/$metadata",
        "value": [{"name": e.entity_set, "kind": "EntitySet", "url": e.entity_set} for e in ENTITIES.values()],
    })


@lru_cache(maxsize=8)
def _csdl(variant_key: str = "") -> bytes:
    from .service import OrgVariant

    variant = OrgVariant.from_json(json.loads(variant_key)) if variant_key else OrgVariant()
    ns = "Microsoft.Dynamics.CRM"
    parts = ['<?xml version="1.0" encoding="utf-8"?>',
             '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
             "<edmx:DataServices>",
             f'<Schema Namespace="{ns}" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    parts.append('<EntityType Name="crmbaseentity" Abstract="true"/>')
    # owner lookups are typed by the abstract principal (systemuser and team), as in Dataverse's CSDL
    parts.append('<EntityType Name="principal" BaseType="mscrm.crmbaseentity" Abstract="true">'
                 '<Property Name="ownerid" Type="Edm.Guid"/></EntityType>')
    for ent in ENTITIES.values():
        parts.append(f'<EntityType Name="{ent.logical_name}" BaseType="mscrm.crmbaseentity">')
        parts.append(f'<Key><PropertyRef Name="{ent.primary_id}"/></Key>')
        for col in ent.columns.values():
            parts.append(f'<Property Name="{escape(col.value_key)}" Type="{EDM_TYPES[col.type]}"/>')
        for nav in variant.navs(ent).values():
            # One NavigationProperty per declared name. A name two relationships declare (acceptingentityid) is
            # typed by the first; a multi-target owner is typed mscrm.principal as in Dataverse.
            target = "principal" if nav.targets == ("systemuser", "team") else nav.targets[0]
            ref = ENTITIES[target].primary_id if target in ENTITIES else "ownerid" if target == "principal" else "id"
            parts.append(f'<NavigationProperty Name="{nav.name}" Type="mscrm.{target}" Nullable="true">'
                         f'<ReferentialConstraint Property="_{nav.column}_value" ReferencedProperty="{ref}"/>'
                         "</NavigationProperty>")
        for cnav in ent.collections.values():
            parts.append(f'<NavigationProperty Name="{cnav.name}" Type="Collection(mscrm.{cnav.target})"/>')
        parts.append("</EntityType>")
    parts.append('<ComplexType Name="WhoAmIResponse"><Property Name="BusinessUnitId" Type="Edm.Guid"/>'
                 '<Property Name="UserId" Type="Edm.Guid"/><Property Name="OrganizationId" Type="Edm.Guid"/>'
                 "</ComplexType>")
    parts.append('<ComplexType Name="SendEmailResponse"><Property Name="Subject" Type="Edm.String"/></ComplexType>')
    parts.append('<ComplexType Name="GetTrackingTokenEmailResponse">'
                 '<Property Name="TrackingToken" Type="Edm.String"/></ComplexType>')
    parts.append('<Function Name="WhoAmI"><ReturnType Type="mscrm.WhoAmIResponse" Nullable="false"/></Function>')
    parts.append('<Action Name="SendEmail" IsBound="true"><Parameter Name="entity" Type="mscrm.email" '
                 'Nullable="false"/><Parameter Name="IssueSend" Type="Edm.Boolean" Nullable="false"/>'
                 '<Parameter Name="TrackingToken" Type="Edm.String" Unicode="false"/>'
                 '<ReturnType Type="mscrm.SendEmailResponse" Nullable="false"/></Action>')
    parts.append('<Action Name="GetTrackingTokenEmail"><Parameter Name="Subject" Type="Edm.String" Unicode="false"/>'
                 '<ReturnType Type="mscrm.GetTrackingTokenEmailResponse" Nullable="false"/></Action>')
    parts.append('<EntityContainer Name="System">')
    for ent in ENTITIES.values():
        parts.append(f'<EntitySet Name="{ent.entity_set}" EntityType="mscrm.{ent.logical_name}"/>')
    parts.append('<FunctionImport Name="WhoAmI" Function="mscrm.WhoAmI"/>')
    parts.append('<ActionImport Name="GetTrackingTokenEmail" Action="mscrm.GetTrackingTokenEmail"/>')
    parts.append("</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>")
    return "\n".join(parts).encode()


def csdl_response(variant: OrgVariant | None = None) -> ApiResponse:
    from .service import ApiResponse

    key = json.dumps(variant.to_json(), sort_keys=True) if variant is not None else ""
    return ApiResponse(200, {"Content-Type": "application/xml", "OData-Version": "4.0"}, _csdl(key))
