from __future__ import annotations

import uuid

import pytest

from core.domain.identity import (
    activity_id_for,
    attachment_id_for,
    canonical_message_id,
    contact_id_for,
    normalize_message_id,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("<abc@host>", "abc@host"),
        ("  <abc@host>\r\n ", "abc@host"),
        ("abc@host", "abc@host"),
        ("<AbC@Host.Example>", "AbC@Host.Example"),  # case kept (RFC 5322 defines no case folding for msg-id)
        ("<a b@host>", "ab@host"),  # folding whitespace inside removed
    ],
)
def test_normalize_message_id(raw: str, normalized: str) -> None:
    assert normalize_message_id(raw) == normalized
    assert canonical_message_id(raw) == f"<{normalized}>"


@pytest.mark.parametrize("raw", ["", "  ", "<>", " < > "])
def test_empty_message_id_is_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_message_id(raw)


def test_activity_id_is_deterministic_across_spellings_of_the_same_id() -> None:
    ids = {activity_id_for(s) for s in ("<m1@fabrikam.com>", "m1@fabrikam.com", " <m1@fabrikam.com> ")}
    assert len(ids) == 1
    (only,) = ids
    assert only.version == 5


def test_activity_id_is_stable_forever() -> None:
    # Pinned: changing the namespace would re-create every already tracked email under a new id.
    assert activity_id_for("<m1@fabrikam.com>") == uuid.uuid5(uuid.UUID("6eac563e-f208-5bc1-803e-c005b11a0bb4"),
                                                               "m1@fabrikam.com")


def test_activity_id_distinguishes_case_and_messages() -> None:
    assert activity_id_for("<abc@host>") != activity_id_for("<ABC@host>")
    assert activity_id_for("<m1@host>") != activity_id_for("<m2@host>")


def test_attachment_and_contact_ids_are_deterministic() -> None:
    activity = activity_id_for("<m1@host>")
    assert attachment_id_for(activity, 0, "a.pdf") == attachment_id_for(activity, 0, "a.pdf")
    assert attachment_id_for(activity, 0, "a.pdf") != attachment_id_for(activity, 1, "a.pdf")
    assert contact_id_for("Carol@Fabrikam.com ") == contact_id_for("carol@fabrikam.com")
