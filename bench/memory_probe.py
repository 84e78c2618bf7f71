"""Peak RSS of one message with a 25 MB attachment through the pure inbound path, in a fresh process.

Run as ``python -m bench.memory_probe [--mb 25]``: prints JSON with the baseline RSS after imports, the peak RSS
(``ru_maxrss``) after Graph JSON -> normalize -> plan -> Dataverse rows, and what the plan kept. The attachment is
built the way Graph delivers it (base64 ``contentBytes`` inside the message JSON text) and parsed from that text.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import sys
from datetime import UTC, datetime


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=25.0)
    args = parser.parse_args()

    import uuid

    from core.domain.inbound import InboundContext, TrackEmail, plan_attachment_rows, plan_email_row, plan_inbound
    from core.domain.model import (
        CrmRecordRef,
        CrmTable,
        FolderKind,
        InboundMethod,
        MailboxConfig,
        MailboxKind,
        OrgEmailSettings,
        TrackingFilter,
    )
    from core.domain.normalize import normalize_graph_message

    baseline_kib = _rss_kib()
    size = int(args.mb * 1024 * 1024)
    payload = os.urandom(size)
    text = json.dumps({
        "id": "AAMk-mem", "subject": "big", "internetMessageId": "<big@fabrikam.example>",
        "from": {"emailAddress": {"address": "carol@fabrikam.example"}},
        "toRecipients": [{"emailAddress": {"address": "alice@contoso.example"}}],
        "receivedDateTime": "2026-03-02T12:00:00Z", "body": {"contentType": "html", "content": "<p>see attached</p>"},
        "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "big.bin", "size": size,
                         "contentType": "application/octet-stream",
                         "contentBytes": base64.b64encode(payload).decode("ascii")}],
    })
    del payload
    data = json.loads(text)
    del text
    mailbox = MailboxConfig(address="alice@contoso.example", kind=MailboxKind.USER,
                            owner=CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1)),
                            inbound_method=InboundMethod.INDIVIDUAL, tracking_filter=TrackingFilter.ALL)
    # The org limit is raised so the attachment is really kept and encoded for CRM (the worst case).
    org = OrgEmailSettings(max_attachment_bytes=size * 2)
    message = normalize_graph_message(mailbox.address, data, FolderKind.INBOX)
    del data
    plan = plan_inbound(message, InboundContext(mailbox=mailbox, org=org, now=datetime.now(UTC)))
    kept = 0
    if isinstance(plan, TrackEmail):
        plan_email_row(plan)
        rows = plan_attachment_rows(plan)
        kept = sum(len(r["body"]) for r in rows)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({"attachment_mb": args.mb, "baseline_rss_mib": round(baseline_kib / 1024, 1),
               "peak_rss_mib": round(peak_kib / 1024, 1),
               "peak_over_baseline_mib": round((peak_kib - baseline_kib) / 1024, 1),
               "tracked": isinstance(plan, TrackEmail), "attachment_base64_bytes_planned": kept,
               "path": "core.domain: json -> normalize_graph_message -> plan_inbound -> plan_attachment_rows"},
              sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
