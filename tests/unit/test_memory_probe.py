"""The memory probe's path (bench/memory_probe.py) still drives the real processor and delivers a large attachment
to Dataverse intact and once - so the benchmark row cannot silently stop measuring the real code. No memory or time
is asserted here (that is `make bench`'s job)."""

from __future__ import annotations

import base64
import hashlib
import os

from bench.memory_probe import MIB, _BatchBodyReader, build_probe
from core.domain.model import Base64Content


async def test_a_large_attachment_goes_through_the_processor_streamed_intact_and_once() -> None:
    probe = build_probe()
    try:
        # Over GraphMailClient's 4 MiB JSON threshold: read raw through $value, like the probe's 25 MB one.
        sent = await probe.track("m1", 5 * MIB + 1, seed=7)
    finally:
        await probe.close()

    assert sent["outcome"] == "tracked"
    assert sent["attachment_bytes_received"] == 5 * MIB + 1
    assert sent["attachment_base64_chars_received"] == 4 * ((5 * MIB + 1 + 2) // 3)
    graph_calls = [c.split("?")[0] for c in probe.graph.calls]
    assert graph_calls == ["GET /users/alice@contoso.example/messages/m1",
                           "GET /users/alice@contoso.example/messages/m1/attachments/att-m1/$value"]
    assert probe.graph.messages["m1"][1][0].downloads == 1
    assert probe.dataverse.write_batches == 1 and len(probe.dataverse.attachments) == 1
    assert probe.dataverse.attachments[0].sha256 == probe.graph.messages["m1"][1][0].sent_sha256
    assert [method for method, url in probe.dataverse.operations if "activitymimeattachments" in url] == ["POST"]
    # The $batch body was streamed: no piece of it arrived larger than one encoded chunk of the attachment.
    assert probe.dataverse.largest_chunk <= len(Base64Content(bytes(Base64Content.CHUNK)))


def _attachment_batch(content: bytes) -> bytes:
    return (b'--batch_1\r\nContent-Type: multipart/mixed; boundary="changeset_1"\r\n\r\n--changeset_1\r\n'
            b"Content-Type: application/http\r\nContent-ID: 1\r\n\r\n"
            b"POST /api/data/v9.2/emails HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
            b'{"subject":"x","description":"<p>\\"body\\":</p>"}\r\n--changeset_1\r\n'
            b"Content-Type: application/http\r\nContent-ID: 2\r\n\r\n"
            b"POST /api/data/v9.2/activitymimeattachments HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
            b'{"filename":"a.bin","body":"' + base64.b64encode(content) + b'","mimetype":"x/y"}\r\n'
            b"--changeset_1--\r\n--batch_1--\r\n")


def test_the_dataverse_side_hashes_what_it_received_whatever_the_chunking() -> None:
    content = os.urandom(200_003)
    body = _attachment_batch(content)
    for size in (1, 7, 4096, len(body)):
        reader = _BatchBodyReader()
        for start in range(0, len(body), size):
            reader.feed(body[start:start + size])
        operations = reader.finish()
        assert [a.sha256 for a in reader.attachments] == [hashlib.sha256(content).hexdigest()], size
        assert reader.attachments[0].decoded_bytes == len(content)
        assert [m for m, _ in operations] == ["POST", "POST"]


def test_a_changed_attachment_is_noticed() -> None:
    content = os.urandom(3000)
    altered = bytearray(content)
    altered[1500] ^= 1
    reader = _BatchBodyReader()
    reader.feed(_attachment_batch(bytes(altered)))
    reader.finish()
    assert reader.attachments[0].sha256 != hashlib.sha256(content).hexdigest()
