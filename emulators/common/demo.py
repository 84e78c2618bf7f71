"""Identities of the local demo/test tenant shared by the emulators' default seeds and the stack.

All values are obviously fake and only valid against the local emulators.
"""

from typing import Final

TENANT_ID: Final = "c0ffee00-0000-4000-8000-000000000001"
TENANT_DOMAIN: Final = "contoso.example"
APP_CLIENT_ID: Final = "c0ffee00-0000-4000-8000-0000000000a1"
APP_OBJECT_ID: Final = "c0ffee00-0000-4000-8000-0000000000a2"  # service principal object id
APP_CLIENT_SECRET: Final = "local-dev-secret-not-for-production"  # noqa: S105 - emulator-only demo credential
GRAPH_RESOURCE: Final = "https://graph.microsoft.com"
# What docs/deploy.md §2.1 tells admins to grant: Mail.Read alongside Mail.ReadWrite, Mail.Send, the inbox rules and
# User.Read.All (mailbox object ids).
GRAPH_APP_ROLES: Final = ("Mail.Read", "Mail.ReadWrite", "Mail.Send", "MailboxSettings.ReadWrite", "User.Read.All")
# The router's user-assigned managed identity (federated identity credential on the app registration).
MANAGED_IDENTITY_CLIENT_ID: Final = "c0ffee00-0000-4000-8000-0000000000b1"
MANAGED_IDENTITY_PRINCIPAL_ID: Final = "c0ffee00-0000-4000-8000-0000000000b2"
MANAGED_IDENTITY_HEADER: Final = "local-identity-header-not-for-production"
TOKEN_EXCHANGE_AUDIENCE: Final = "api://AzureADTokenExchange"  # noqa: S105 - an audience, not a secret
