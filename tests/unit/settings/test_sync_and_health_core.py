"""Pure parts of the CRM sync (join, plan) and of mailbox health (back-off, transitions, CRM columns)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from core.domain.model import CrmRecordRef, InboundMethod, MailboxConfig, MailboxKind, OutboundMethod
from core.settings.crm_sync import crm_mailboxes, org_crm_values, plan_org_sync, plan_sync, sync_due
from core.settings.health import (
    CheckResult,
    Health,
    ProbeOutcome,
    ProbeState,
    backoff,
    checks_for,
    crm_mailbox_update,
    next_state,
    subscription_verdict,
)
from core.settings.rows import RouterSettings

NOW = datetime(2030, 1, 1, tzinfo=UTC)
U1, U2, Q1, M1 = (str(uuid.uuid4()) for _ in range(4))


def test_join_reports_bad_values_and_duplicate_addresses() -> None:
    users = [
        {"systemuserid": U1, "internalemailaddress": "A@x.example", "incomingemaildeliverymethod": 2,
         "outgoingemaildeliverymethod": 9, "emailrouteraccessapproval": 1},
        {"systemuserid": U2, "internalemailaddress": "b@x.example", "incomingemaildeliverymethod": 3,
         "outgoingemaildeliverymethod": 0, "isdisabled": True},
        {"systemuserid": str(uuid.uuid4()), "internalemailaddress": "app@x.example", "applicationid": "x"},
    ]
    queues = [{"queueid": Q1, "emailaddress": "b@x.example", "incomingemaildeliverymethod": 2}]
    found, errors = crm_mailboxes(users, queues, [], [{"systemuserid": U2, "incomingemailfilteringmethod": 0}])
    assert [m.address for m in found] == ["b@x.example"]
    assert found[0].columns["CrmDisabled"] is True and found[0].columns["CrmFilter"] == "all"
    assert any("outgoing" in e.lower() or "9" in e for e in errors)
    assert any("also used by systemuser" in e for e in errors)


def test_plan_touches_only_crm_columns_and_never_admin_rows() -> None:
    found, _ = crm_mailboxes([{"systemuserid": U1, "internalemailaddress": "a@x.example",
                               "incomingemaildeliverymethod": 2, "outgoingemaildeliverymethod": 2}], [], [], [])
    existing = [
        {"RowKey": "a@x.example", "Address": "a@x.example", **found[0].columns, "OverrideInbound": "none"},
        {"RowKey": "gone@x.example", "Address": "gone@x.example", "CrmKind": "user"},
        {"RowKey": "admin@x.example", "Address": "admin@x.example", "OverrideKind": "forward_sink"},
    ]
    plan = plan_sync(found, existing, NOW)
    assert plan.report.unchanged == 1 and plan.report.disabled == ["gone@x.example"]
    assert [w["RowKey"] for w in plan.writes] == ["gone@x.example"]
    assert all(not k.startswith("Override") for w in plan.writes for k in w)
    assert plan.writes[0]["RemovedFromCrm"] is True


def test_org_values_and_sync_interval() -> None:
    values = org_crm_values({"maxuploadfilesize": 5242880, "requireapprovalforuseremail": False, "x": 1})
    assert values == {"MaxAttachmentBytes": "5242880", "RequireApprovalForUserEmail": "false"}
    assert plan_org_sync(values, [{"RowKey": "MaxAttachmentBytes", "CrmValue": "5242880"}]) == [
        {"PartitionKey": "org", "RowKey": "RequireApprovalForUserEmail", "CrmValue": "false"}]
    assert sync_due(None, NOW, 15) and sync_due(NOW - timedelta(minutes=15), NOW, 15)
    assert not sync_due(NOW - timedelta(minutes=10), NOW, 15)


def test_backoff_doubles_and_caps() -> None:
    base, cap = timedelta(minutes=15), timedelta(minutes=240)
    assert [backoff(n, base, cap) for n in (1, 2, 3, 5, 50)] == [
        base, 2 * base, 4 * base, cap, cap]


def mailbox(**kw: object) -> MailboxConfig:
    values: dict[str, object] = {"inbound_method": InboundMethod.INDIVIDUAL, "outbound_method": OutboundMethod.ROUTER,
                                 **kw}
    return MailboxConfig(address="a@x.example", kind=MailboxKind.USER,  # type: ignore[arg-type]
                         owner=CrmRecordRef("systemuser", uuid.uuid4()), **values)


def test_checks_depend_on_methods() -> None:
    assert checks_for(mailbox()) == {"incoming": ("graph_read", "subscription", "crm_owner", "sss_incoming"),
                                     "outgoing": ("graph_send", "crm_owner", "sss_outgoing", "crm_concurrency")}
    assert checks_for(mailbox(enabled_for_outgoing=False))["outgoing"] == ()
    forward = mailbox(inbound_method=InboundMethod.FORWARD, outbound_method=OutboundMethod.NONE)
    assert checks_for(forward) == {"incoming": ("forward_rule", "crm_owner", "sss_incoming"), "outgoing": ()}


def test_transitions_raise_alerts_except_first_baseline() -> None:
    router = RouterSettings()
    ok = [CheckResult(n, True, "") for n in ("graph_read", "subscription", "crm_owner", "graph_send")]
    bad = [CheckResult("graph_read", False, "denied", 403), *ok[1:]]
    state, incoming, outgoing, alert = next_state(ProbeState(), mailbox(), ok, NOW, router)
    assert state.health is Health.OK and alert is None and incoming is outgoing is Health.OK
    state, incoming, outgoing, alert = next_state(state, mailbox(), bad, NOW, router)
    assert state.health is Health.FAILING and incoming is Health.FAILING and outgoing is Health.OK
    assert alert and "graph_read: denied" in alert and state.next_probe == NOW + timedelta(minutes=15)
    state, *_, alert = next_state(state, mailbox(), bad, NOW, router)
    assert alert is None and state.failures == 2 and state.next_probe == NOW + timedelta(minutes=30)
    state, *_, alert = next_state(state, mailbox(), ok, NOW, router)
    assert alert == "a@x.example changed from failing to ok" and state.failures == 0


def test_pending_is_neither_a_failure_nor_an_alert() -> None:
    router = RouterSettings()
    waiting = CheckResult("subscription", False, "waiting for the first subscription reconcile", pending=True)
    ok = [CheckResult(n, True, "") for n in ("graph_read", "crm_owner", "graph_send")]
    state, incoming, outgoing, alert = next_state(ProbeState(), mailbox(), [waiting, *ok], NOW, router)
    assert state.health is Health.PENDING and incoming is Health.PENDING and outgoing is Health.OK
    assert alert is None and state.failures == 0 and state.next_probe == NOW + timedelta(minutes=1)
    assert state.settled is Health.UNKNOWN
    # pending -> ok is the first baseline (no alert); a later failure alerts as usual
    done = CheckResult("subscription", True, "1 subscription(s)")
    state, *_, alert = next_state(state, mailbox(), [done, *ok], NOW, router)
    assert state.health is Health.OK and alert is None and state.settled is Health.OK
    broken = CheckResult("subscription", False, "the last reconcile could not write it")
    state, *_, alert = next_state(state, mailbox(), [broken, *ok], NOW, router)
    assert state.health is Health.FAILING and alert and "subscription: the last reconcile" in alert
    # failing -> pending (a reconcile is re-creating it) -> ok: one recovery alert, when it is ok
    state, *_, alert = next_state(state, mailbox(), [waiting, *ok], NOW, router)
    assert state.health is Health.PENDING and alert is None and state.settled is Health.FAILING
    state, *_, alert = next_state(state, mailbox(), [done, *ok], NOW, router)
    assert alert == "a@x.example changed from failing to ok"


def test_subscription_verdict() -> None:
    grace = timedelta(minutes=30)
    since = NOW - timedelta(minutes=2)

    def verdict(**kw: object) -> CheckResult:
        args: dict[str, object] = {"expired": False, "row": {}, "needed_since": since, "reconcile_running": None,
                                   "reconciled_from": None, "now": NOW, "grace": grace}
        args.update(kw)
        return subscription_verdict(**args)  # type: ignore[arg-type]

    first = verdict()
    assert first.pending and "waiting for the first subscription reconcile" in first.detail
    running = verdict(reconcile_running="timer@h:1:a", reconciled_from=NOW - timedelta(hours=1))
    assert running.pending and "timer@h:1:a" in running.detail
    before = verdict(reconciled_from=since - timedelta(seconds=1))  # that reconcile read the settings earlier
    assert before.pending
    seen = verdict(reconciled_from=since + timedelta(seconds=30))
    assert not seen.ok and not seen.pending and "although a reconcile ran" in seen.detail
    stale = verdict(needed_since=NOW - timedelta(minutes=31))
    assert not stale.pending and "is the subscription_reconcile timer running" in stale.detail
    failed = verdict(row={"InboundLastSyncError": "subscription inbox: create: HTTP 403 ErrorAccessDenied",
                          "InboundLastSyncErrorAt": NOW - timedelta(seconds=5)}, reconcile_running="x")
    assert not failed.pending and "HTTP 403" in failed.detail
    recovered = verdict(row={"InboundLastSyncError": "subscription inbox: create: HTTP 403",
                             "InboundLastSyncErrorAt": NOW - timedelta(hours=2),
                             "InboundLastSyncAt": NOW - timedelta(hours=1)})
    assert recovered.pending
    assert not verdict(expired=True).pending


def test_crm_columns_for_failure_and_success() -> None:
    failing = ProbeOutcome("a@x.example", Health.FAILING, Health.FAILING, Health.OK,
                           (CheckResult("graph_read", False, "denied", 403),), ProbeState(Health.FAILING, 3))
    body = crm_mailbox_update(failing, NOW)
    assert (body["incomingemailstatus"], body["outgoingemailstatus"]) == (2, 1)
    assert body["lastsyncerrorcode"] == 403
    # read-only in mailbox.md: kept in the router's status table, never written to CRM (audit 1a #5)
    assert "mailboxstatus" not in body and "transientfailurecount" not in body
    long = ProbeOutcome("a@x.example", Health.FAILING, Health.FAILING, Health.OK,
                        (CheckResult("graph_read", False, "x" * 5000, 403),), ProbeState(Health.FAILING, 1))
    assert len(crm_mailbox_update(long, NOW)["lastsyncerror"]) == 2048
    healthy = ProbeOutcome("a@x.example", Health.OK, Health.OK, Health.NOT_APPLICABLE, (), ProbeState(Health.OK))
    body = crm_mailbox_update(healthy, NOW)
    assert body["outgoingemailstatus"] == 0 and body["lastsyncerror"] == "" and "lastsuccessfulsynccompletedon" in body


def test_blueprint_imports_without_io() -> None:
    import azure.functions as func

    from functions.settings_functions import bp

    app = func.FunctionApp()
    app.register_functions(bp)
    assert {f.get_function_name() for f in app.get_functions()} == {"crm_settings_sync", "mailbox_health_probe"}
