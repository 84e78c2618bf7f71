"""Chaos end-to-end runs over the whole local stack (issue 10): faults, duplicated/dropped notifications, a killed
host; the final CRM state and the outbox must equal the expected ones."""
