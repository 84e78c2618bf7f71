"""The metadata extractor (emulators/graph/metadata/extract.py) on a tiny CSDL of Microsoft's shape."""

from __future__ import annotations

import pytest

from emulators.graph.metadata import Metadata, load_metadata
from emulators.graph.metadata.extract import extract

CSDL = b"""<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">
  <edmx:DataServices>
    <Schema Namespace="microsoft.graph" Alias="graph" xmlns="http://docs.oasis-open.org/odata/ns/edm">
      <EnumType Name="importance"><Member Name="low" Value="0" /><Member Name="high" Value="2" /></EnumType>
      <EnumType Name="unused"><Member Name="x" Value="0" /></EnumType>
      <ComplexType Name="recipient"><Property Name="emailAddress" Type="graph.emailAddress" /></ComplexType>
      <ComplexType Name="emailAddress"><Property Name="address" Type="Edm.String" /></ComplexType>
      <EntityType Name="entity" Abstract="true"><Key><PropertyRef Name="id" /></Key>
        <Property Name="id" Type="Edm.String" Nullable="false" /></EntityType>
      <EntityType Name="note" BaseType="graph.entity" OpenType="true">
        <Property Name="to" Type="Collection(graph.recipient)" />
        <Property Name="importance" Type="graph.importance" />
        <NavigationProperty Name="children" Type="Collection(graph.other)" ContainsTarget="true" />
      </EntityType>
      <EntityType Name="other" BaseType="graph.entity" />
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>"""


def test_extract_follows_base_types_complex_types_and_enums() -> None:
    doc = extract(CSDL, ["note"], commit="0" * 40, path="schemas/test.csdl")
    assert sorted(doc["types"]) == ["emailAddress", "entity", "note", "recipient"]  # "other": a nav target only
    assert doc["enums"] == {"importance": ["low", "high"]}
    note = doc["types"]["note"]
    assert note["baseType"] == "entity" and note["openType"] is True
    assert note["navigationProperties"] == {"children": {"type": "Collection(graph.other)"}}
    meta = Metadata(doc)
    assert set(meta.properties("note")) == {"id", "to", "importance"}
    assert meta.properties("note")["id"] == {"type": "Edm.String", "nullable": False}
    assert meta.derives_from("note", "entity") and not meta.derives_from("entity", "note")


def test_extract_refuses_unknown_types() -> None:
    with pytest.raises(SystemExit):
        extract(CSDL, ["nope"], commit="0" * 40)


def test_the_committed_extract_records_its_source() -> None:
    meta = load_metadata()
    assert meta.source["repository"] == "microsoftgraph/msgraph-metadata"
    assert {"message", "mailFolder", "itemAttachment", "subscription", "user", "changeNotification"} <= set(meta.types)
    assert "sizeInBytes" not in meta.properties("mailFolder")  # v1.0 (beta has it)
