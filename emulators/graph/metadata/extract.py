"""Extract the types the Graph emulator serves from Microsoft Graph's v1.0 CSDL into ``graph-v1.0.json``.

Input: the v1.0 CSDL of the microsoftgraph/msgraph-metadata repository (``schemas/v1.0-Prod.csdl``, the file
"handed off ... directly from the runtime engine of Microsoft Graph"). Output: for each root type below, its
declared properties (name, type, nullability) and navigation properties, its base types, and every complex and
enum type those properties use (transitively). Navigation targets are recorded by name only; entity types are
followed only when they are roots or base types.

    python -m emulators.graph.metadata.extract path/to/v1.0-Prod.csdl \\
        --commit <commit of the CSDL in msgraph-metadata> [--out emulators/graph/metadata/graph-v1.0.json]

The output is deterministic (sorted keys) so a re-run on the same CSDL changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import EXTRACT_PATH

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NAMESPACE = "microsoft.graph"
ALIAS = "graph"
SOURCE_REPOSITORY = "microsoftgraph/msgraph-metadata"
SOURCE_PATH = "schemas/v1.0-Prod.csdl"

# What the emulator serves or reads back (mail, folders, attachments, rules, subscriptions, notifications,
# upload sessions, the directory's users): every one of them with its base types.
ROOT_TYPES: tuple[str, ...] = (
    "message", "mailFolder", "fileAttachment", "itemAttachment", "referenceAttachment", "messageRule",
    "subscription", "user", "singleValueLegacyExtendedProperty", "multiValueLegacyExtendedProperty",
    "recipient", "emailAddress", "itemBody", "internetMessageHeader", "followupFlag", "dateTimeTimeZone",
    "messageRulePredicates", "messageRuleActions", "sizeRange", "uploadSession", "attachmentItem",
    "changeNotification", "changeNotificationCollection", "resourceData",
)
# user has hundreds of properties; the emulator models a directory entry for mailbox lookup only.
PROPERTY_SUBSETS: dict[str, tuple[str, ...]] = {
    "user": ("accountEnabled", "businessPhones", "displayName", "givenName", "jobTitle", "mail", "mailNickname",
             "mobilePhone", "officeLocation", "otherMails", "preferredLanguage", "proxyAddresses", "surname",
             "userPrincipalName"),
}


def _local(type_name: str) -> str | None:
    """``Collection(graph.recipient)`` -> ``recipient``; ``Edm.String`` -> None."""
    inner = type_name[len("Collection("):-1] if type_name.startswith("Collection(") else type_name
    for prefix in (f"{ALIAS}.", f"{NAMESPACE}."):
        if inner.startswith(prefix):
            return inner[len(prefix):]
    return None


def _schema(root: ET.Element) -> ET.Element:
    for schema in root.iter(f"{EDM}Schema"):
        if schema.get("Namespace") == NAMESPACE:
            return schema
    raise SystemExit(f"no Schema Namespace={NAMESPACE!r} in the CSDL")


def extract(csdl: bytes, roots: Iterable[str] = ROOT_TYPES, *, commit: str, path: str = SOURCE_PATH
            ) -> dict[str, Any]:
    schema = _schema(ET.fromstring(csdl))  # noqa: S314 - Microsoft's published CSDL, read by a developer tool
    entities = {e.get("Name"): e for e in schema.findall(f"{EDM}EntityType")}
    complexes = {e.get("Name"): e for e in schema.findall(f"{EDM}ComplexType")}
    enums = {e.get("Name"): e for e in schema.findall(f"{EDM}EnumType")}
    types: dict[str, Any] = {}
    enum_out: dict[str, list[str]] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in types:
            continue
        element = entities.get(name) if name in entities else complexes.get(name)  # (childless Elements are falsy)
        if element is None:
            raise SystemExit(f"type {name!r} is not in the CSDL")
        kind = "entity" if name in entities else "complex"
        entry: dict[str, Any] = {"kind": kind}
        base = element.get("BaseType")
        if base:
            entry["baseType"] = _local(base)
            pending.append(str(entry["baseType"]))
        if element.get("Abstract") == "true":
            entry["abstract"] = True
        if element.get("OpenType") == "true":
            entry["openType"] = True
        subset = PROPERTY_SUBSETS.get(name)
        props: dict[str, Any] = {}
        for prop in element.findall(f"{EDM}Property"):
            pname = str(prop.get("Name"))
            if subset is not None and pname not in subset:
                continue
            ptype = str(prop.get("Type"))
            props[pname] = {"type": ptype, "nullable": prop.get("Nullable") != "false"}
            target = _local(ptype)
            if target in complexes:
                pending.append(target)
            elif target in enums and target not in enum_out:
                enum_out[target] = [str(m.get("Name")) for m in enums[target].findall(f"{EDM}Member")]
        if subset is not None:
            missing = sorted(set(subset) - set(props))
            if missing:
                raise SystemExit(f"{name}: properties {missing} are not in the CSDL")
        if props:
            entry["properties"] = props
        navs = {str(n.get("Name")): {"type": str(n.get("Type"))} for n in element.findall(f"{EDM}NavigationProperty")}
        if navs and subset is None:
            entry["navigationProperties"] = navs
        types[name] = entry
    return {
        "source": {"repository": SOURCE_REPOSITORY, "path": path, "commit": commit,
                   "note": "generated by emulators/graph/metadata/extract.py; do not edit by hand"},
        "namespace": NAMESPACE,
        "types": dict(sorted(types.items())),
        "enums": dict(sorted(enum_out.items())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.graph.metadata.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csdl", type=Path, help="the v1.0 CSDL (msgraph-metadata schemas/v1.0-Prod.csdl)")
    parser.add_argument("--commit", required=True, help="msgraph-metadata commit the CSDL was taken from")
    parser.add_argument("--path", default=SOURCE_PATH, help="the CSDL's path in msgraph-metadata")
    parser.add_argument("--out", type=Path, default=EXTRACT_PATH)
    args = parser.parse_args(argv)
    doc = extract(args.csdl.read_bytes(), commit=args.commit, path=args.path)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(doc['types'])} types, {len(doc['enums'])} enums -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
