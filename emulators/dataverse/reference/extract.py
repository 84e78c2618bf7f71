"""Extract the emulator's table schema from Microsoft's generated entity reference pages.

Input: a directory of pages from ``MicrosoftDocs/powerapps-docs`` (``powerapps-docs/developer/data-platform/reference/
entities/<table>.md``) and, for the Dynamics 365 apps tables (lead, opportunity, incident), from
``MicrosoftDocs/dynamics-365-customer-engagement`` (``ce/developer/reference/entities/<table>.md``) — whole pages or
excerpts of them — and ``sources.json`` (which page each table comes from, the commit it was read at, and which of its
columns the emulator carries). Output: one JSON file per table in ``tables/``.

A table may also list ``supplements``: other pages (``page``, with their own repo/path/commit) whose Many-to-One
relationships are merged into the table — a later version of the same page that states the navigation property names
the older layout lacks, or the Dynamics 365 extension page of a Dataverse table (its relationships to lead, opportunity
and incident, and its "Customized columns/attributes", whose ``Targets`` extend a column's targets). A supplement may
also name ``columns`` the base page does not carry (taken from the supplement's own blocks). Only relationships whose
referencing column the table carries are kept.

The pages come in two layouts (the generator changed over time); both are parsed:

* current: ``| **EntitySetName** | `emails`|`` properties, ``|LogicalName|`subject`|`` rows, state/status options as
  ``|0|Label: **Open**<br />DefaultStatus: 1<br />...|``, and Many-to-One blocks with
  ``|ReferencingEntityNavigationPropertyName|`ReceivingMailboxId_Email`|``;
* older: ``|EntitySetName|mailboxes|`` and ``|LogicalName|name|`` without backticks, options as
  ``|Value|Label|DefaultStatus|InvariantName|`` / ``|Value|Label|State|`` tables, explicit
  ``|IsValidForCreate|False|`` / ``|IsValidForUpdate|False|`` rows, and Many-To-One sections that only point at the
  other table's page (no navigation property name: such a table declares no single-valued navigation property
  here).

Writability: the page lists every column under "Writable columns/attributes" (IsValidForCreate or IsValidForUpdate
true) or "Read-only columns/attributes" (both false); an explicit ``IsValidForCreate``/``IsValidForUpdate`` row
refines a writable column.

Refresh (needs GitHub access, which our machines do not have at run time)::

    git clone --depth 1 --filter=blob:none --sparse https://github.com/MicrosoftDocs/powerapps-docs pad
    git -C pad sparse-checkout set powerapps-docs/developer/data-platform/reference/entities
    cp pad/powerapps-docs/developer/data-platform/reference/entities/{email,activityparty,...}.md \\
       emulators/dataverse/reference/pages/
    git clone --depth 1 --filter=blob:none --sparse \\
        https://github.com/MicrosoftDocs/dynamics-365-customer-engagement ce
    git -C ce sparse-checkout set ce/developer/reference/entities
    cp ce/ce/developer/reference/entities/{lead,opportunity,incident}.md emulators/dataverse/reference/pages/
    cp ce/ce/developer/reference/entities/email.md emulators/dataverse/reference/pages/email.d365.md  # likewise
    # put each clone's `git rev-parse HEAD` into sources.json ("commit", or the supplement's "commit") for the pages
    # you refreshed, then
    python -m emulators.dataverse.reference.extract

and review the diff of ``tables/*.json``. A selected column the page no longer has is an error, not a silent drop.
A ``*.current.md`` supplement (a later commit of a page whose base excerpt is the older layout) can be dropped once
the base page itself is refreshed to the current layout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

_BLOCK = re.compile(r'^###\s+<a name="BKMK_([^"]+)"></a>\s*(\S+)')
_ROW = re.compile(r"^\|([^|]*)\|(.*)\|\s*$")
_LIST_ITEM = re.compile(r"^- \[([^\]]+)\]\(#BKMK_")
_SECTIONS = {
    "writable columns/attributes": "writable",
    "read-only columns/attributes": "readonly",
    "customized columns/attributes": "customized",
    "many-to-one relationships": "many_to_one",
    "one-to-many relationships": "one_to_many",
}
_PROPERTY_KEYS = {"EntitySetName", "LogicalName", "PrimaryIdAttribute", "PrimaryNameAttribute", "OwnershipType",
                  "SchemaName", "TableType"}
# Attribute types the Web API does not expose as structural properties of the entity type.
_NOT_PROPERTIES = {"PartyList", "Virtual", "File", "Image", "ManagedProperty"}


def _clean(cell: str) -> str:
    return cell.replace("**", "").replace("`", "").strip()


@dataclass
class _Block:
    name: str
    section: str
    rows: dict[str, str] = field(default_factory=dict)
    option_header: list[str] = field(default_factory=list)
    options: list[list[str]] = field(default_factory=list)


@dataclass
class Page:
    properties: dict[str, str]
    writable: list[str]
    readonly: list[str]
    blocks: list[_Block]


def parse_page(text: str) -> Page:
    props: dict[str, str] = {}
    lists: dict[str, list[str]] = {"writable": [], "readonly": []}
    blocks: list[_Block] = []
    section = ""
    current: _Block | None = None
    in_options = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("## "):
            section = _SECTIONS.get(line[3:].strip().lower(), "other" if section else "")
            if line[3:].strip().lower() == "properties":
                section = "properties"
            current, in_options = None, False
            continue
        m = _BLOCK.match(line)
        if m:
            current = _Block(name=m.group(2), section=section)
            blocks.append(current)
            in_options = False
            continue
        if line.startswith("#### ") and current is not None:
            in_options = "Choices/Options" in line
            continue
        if section in lists and current is None:
            item = _LIST_ITEM.match(line)
            if item:
                lists[section].append(item.group(1))
            continue
        row = _ROW.match(line)
        if not row:
            continue
        key, value = _clean(row.group(1)), row.group(2)
        if set(key) <= {"-", " ", ":"}:
            continue
        if section == "properties" and current is None:
            if key in _PROPERTY_KEYS:
                props[key] = _clean(value)
            continue
        if current is None:
            continue
        if in_options:
            cells = [_clean(c) for c in [key, *value.split("|")]]
            if key == "Value":
                current.option_header = cells
            else:
                current.options.append(cells)
        else:
            current.rows[key] = _clean(value)
    return Page(props, lists["writable"], lists["readonly"], blocks)


def _int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _options(block: _Block) -> tuple[dict[str, str], dict[str, int]]:
    """Option labels by value, plus the per-option extra number (a state's default status, a status's state)."""
    labels: dict[str, str] = {}
    extra: dict[str, int] = {}
    header = block.option_header
    for cells in block.options:
        value = _int(cells[0])
        if value is None:
            continue
        if len(header) >= 2 and header[1] == "Details":
            details = cells[1]
            label = re.search(r"Label:\s*([^<]*)", details)
            labels[str(value)] = label.group(1).strip() if label else ""
            number = re.search(r"(?:DefaultStatus|State):\s*(-?\d+)", details)
            if number:
                extra[str(value)] = int(number.group(1))
        else:
            labels[str(value)] = cells[1] if len(cells) > 1 else ""
            for col in ("DefaultStatus", "State"):
                if col in header and header.index(col) < len(cells):
                    n = _int(cells[header.index(col)])
                    if n is not None:
                        extra[str(value)] = n
    return labels, extra


def _columns(page: Page, selected: list[str] | None) -> dict[str, dict[str, Any]]:
    writable = {name.lower() for name in page.writable}
    readonly = {name.lower() for name in page.readonly}
    columns: dict[str, dict[str, Any]] = {}
    for block in page.blocks:
        if block.section not in ("writable", "readonly"):
            continue
        logical = block.rows.get("LogicalName", "")
        kind = block.rows.get("Type", "")
        if not logical or kind in _NOT_PROPERTIES or (selected is not None and logical not in selected):
            continue
        listed_writable = block.name.lower() in writable and block.name.lower() not in readonly
        col: dict[str, Any] = {
            "schema_name": block.name,
            "type": kind,
            "valid_for_create": listed_writable and block.rows.get("IsValidForCreate") != "False",
            "valid_for_update": listed_writable and block.rows.get("IsValidForUpdate") != "False",
        }
        if "Targets" in block.rows:
            col["targets"] = [t.strip() for t in block.rows["Targets"].split(",") if t.strip()]
        if block.rows.get("FormatName") and kind in ("String", "Memo"):
            col["format_name"] = block.rows["FormatName"]  # Email, Text, Url, ... (StringAttributeMetadata)
        for key, name in (("MaxLength", "max_length"), ("MinValue", "min_value"), ("MaxValue", "max_value")):
            n = _int(block.rows.get(key))
            if n is not None:
                col[name] = n
        if kind in ("Picklist", "State", "Status") and block.options:
            labels, extra = _options(block)
            col["options"] = labels
            if kind == "State":
                col["default_status"] = extra
            elif kind == "Status":
                col["state_of_status"] = extra
        columns[logical] = col
    return columns


def _missing(columns: dict[str, Any], selected: list[str] | None, path: str) -> None:
    if selected is not None:
        missing = sorted(set(selected) - set(columns))
        if missing:
            raise SystemExit(f"{path}: selected columns not on the page: {', '.join(missing)}")


def _many_to_one(page: Page, carried: set[str]) -> list[dict[str, str]]:
    found = []
    for block in page.blocks:
        rows = block.rows
        if block.section == "many_to_one" and rows.get("ReferencingEntityNavigationPropertyName"):
            if rows.get("ReferencingAttribute") not in carried:
                continue
            found.append({
                "schema_name": block.name,
                "referenced_entity": rows.get("ReferencedEntity", ""),
                "referenced_attribute": rows.get("ReferencedAttribute", ""),
                "referencing_attribute": rows.get("ReferencingAttribute", ""),
                "navigation_property": rows["ReferencingEntityNavigationPropertyName"],
            })
    return found


def _supplement(columns: dict[str, dict[str, Any]], many_to_one: list[dict[str, str]], page: Page,
                source: dict[str, Any]) -> None:
    """Merge a supplement page into a table: the columns it is asked for, the ``Targets`` its "Customized
    columns/attributes" add to carried lookups, and its Many-to-One relationships (a relationship the table already
    has keeps the first statement)."""
    extra = _columns(page, source.get("columns") or [])
    _missing(extra, source.get("columns"), source["path"])
    clash = sorted(set(extra) & set(columns))
    if clash:
        raise SystemExit(f"{source['path']}: supplement repeats columns of the base page: {', '.join(clash)}")
    columns.update(extra)
    for block in page.blocks:
        logical = block.name.lower()
        if block.section == "customized" and "Targets" in block.rows and logical in columns:
            targets = columns[logical].setdefault("targets", [])
            targets.extend(t.strip() for t in block.rows["Targets"].split(",")
                           if t.strip() and t.strip() not in targets)
    known = {r["schema_name"] for r in many_to_one}
    many_to_one.extend(r for r in _many_to_one(page, set(columns)) if r["schema_name"] not in known)


def table_schema(page: Page, source: dict[str, Any],
                 supplements: list[tuple[Page, dict[str, Any]]] | None = None) -> dict[str, Any]:
    supplements = supplements or []
    selected = source.get("columns")
    columns = _columns(page, selected)
    _missing(columns, selected, source["path"])
    many_to_one = _many_to_one(page, set(columns) if selected is not None else
                               {b.rows.get("ReferencingAttribute", "") for b in page.blocks})
    for sup_page, sup_source in supplements:
        _supplement(columns, many_to_one, sup_page, sup_source)
    one_to_many = []
    for block in page.blocks:
        rows = block.rows
        if block.section == "one_to_many" and rows.get("ReferencedEntityNavigationPropertyName"):
            one_to_many.append({
                "schema_name": block.name,
                "referencing_entity": rows.get("ReferencingEntity", ""),
                "referencing_attribute": rows.get("ReferencingAttribute", ""),
                "navigation_property": rows["ReferencedEntityNavigationPropertyName"],
            })
    keep_one_to_many = source.get("one_to_many")
    if keep_one_to_many is not None:
        one_to_many = [r for r in one_to_many if r["schema_name"] in keep_one_to_many]
    props = page.properties
    return {
        "logical_name": props.get("LogicalName", ""),
        "schema_name": props.get("SchemaName", ""),
        "entity_set_name": props.get("EntitySetName", ""),
        "primary_id_attribute": props.get("PrimaryIdAttribute", ""),
        "primary_name_attribute": props.get("PrimaryNameAttribute", ""),
        "ownership_type": props.get("OwnershipType", ""),
        "source": {k: source[k] for k in ("repo", "path", "commit")},
        "supplements": [{k: sup[k] for k in ("repo", "path", "commit")} for _, sup in supplements],
        "columns": dict(sorted(columns.items())),
        "many_to_one": sorted(many_to_one, key=lambda r: r["schema_name"].lower()),
        "one_to_many": sorted(one_to_many, key=lambda r: r["schema_name"].lower()),
    }


def extract(pages_dir: Path, sources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for table, source in sources["tables"].items():
        page = parse_page((pages_dir / f"{table}.md").read_text(encoding="utf-8"))
        supplements = [(parse_page((pages_dir / sup["page"]).read_text(encoding="utf-8")), sup)
                       for sup in source.get("supplements", [])]
        schema = table_schema(page, source, supplements)
        if schema["logical_name"] != table:
            raise SystemExit(f"{table}.md describes {schema['logical_name']!r}")
        out[table] = schema
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=HERE / "pages")
    parser.add_argument("--sources", type=Path, default=HERE / "sources.json")
    parser.add_argument("--out", type=Path, default=HERE / "tables")
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON in --out differs from the pages")
    args = parser.parse_args(argv)
    tables = extract(args.pages, json.loads(args.sources.read_text(encoding="utf-8")))
    stale = []
    for name, schema in tables.items():
        text = json.dumps(schema, indent=1, ensure_ascii=False) + "\n"
        target = args.out / f"{name}.json"
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)} (run python -m emulators.dataverse.reference.extract)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
