"""The Graph emulator keeps a client-chosen internetMessageId on a draft (message-update: "Updatable only if isDraft
= true") and refuses one that is no RFC 5322 msg-id."""

from __future__ import annotations

import pytest

from emulators.graph.mail import chosen_internet_message_id
from emulators.graph.util import GraphError


def test_a_well_formed_msg_id_is_kept() -> None:
    assert chosen_internet_message_id("<er.abc.k1@contoso.example>") == "<er.abc.k1@contoso.example>"


@pytest.mark.parametrize("value", ["er@contoso.example", "<no-at>", "<a b@c>", "<@c>", "<a@>", "<a@b@c>", 7,
                                   "<" + "a" * 320 + "@c>"])
def test_anything_else_is_refused(value: object) -> None:
    with pytest.raises(GraphError) as err:
        chosen_internet_message_id(value)
    assert err.value.status == 400
