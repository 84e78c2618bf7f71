"""The benchmark's storage share: which sampled stacks count as storage calls."""

from __future__ import annotations

from bench.cpu import classify

SITE = "/work/.venv/lib/python3.11/site-packages"


def test_stacks_inside_the_storage_sdks_or_our_storage_adapter_count_as_storage() -> None:
    raw = "\n".join([
        f"run (local/host/invoke.py:10);send_message ({SITE}/azure/storage/queue/aio/_queue_client_async.py:667) 5",
        f"main (x.py:1);upsert_entity ({SITE}/azure/data/tables/aio/_table_client_async.py:300) 3",
        "process (/work/main/core/services/inbound.py:300);upsert (/work/main/core/adapters/storage.py:690) 2",
        f"process (/work/main/core/services/inbound.py:300);get ({SITE}/httpx/_client.py:1) 10",
        "",
    ])
    found = classify(raw)
    assert (found["samples"], found["storage_samples"]) == (20, 10)
    assert found["storage_by_part"] == {"azure/storage/": 5, "azure/data/tables/": 3, "core/adapters/storage.py": 2}


def test_shortened_file_names_would_hide_the_sdks() -> None:
    """What py-spy prints without --full-filenames: the namespace package is cut off, so nothing matches. The
    sampler asks for full names; this pins why."""
    found = classify("send_message (queue/aio/_queue_client_async.py:667) 5\nget (httpx/_client.py:1) 5\n")
    assert found["storage_samples"] == 0
