"""Dataverse-shaped errors: ``{"error":{"code":"0x...","message":"..."}}`` with the documented codes and texts.

Each constructor cites where the code/message comes from (``reference/dataverse.md`` section) so a reviewer can tell
documented shapes from emulator choices.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataverseError"]


class DataverseError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.inner = inner

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner is not None:
            err["innererror"] = {"message": self.inner, "type": "System.ServiceModel.FaultException`1"
                                 "[[Microsoft.Xrm.Sdk.OrganizationServiceFault, Microsoft.Xrm.Sdk]]",
                                 "stacktrace": ""}
        return {"error": err}

    # ---- §7.1 "reproduce exactly" -------------------------------------------------------------------------------
    @classmethod
    def resource_not_found(cls, segment: str) -> DataverseError:
        return cls(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")

    @classmethod
    def no_http_resource(cls, url: str) -> DataverseError:
        return cls(404, "", f"No HTTP resource was found that matches the request URI '{url}'.")

    @classmethod
    def unknown_property(cls, name: str, logical: str) -> DataverseError:
        return cls(400, "0x0", f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{logical}'.")

    @classmethod
    def undeclared_nav(cls, name: str) -> DataverseError:
        # §2.3 [qa-undeclared]
        return cls(400, "0x80048d19",
                   "Error identified in Payload provided by the user for Entity :'', ----> InnerException : "
                   f"Microsoft.OData.ODataException: An undeclared property '{name}' which only has property "
                   "annotations in the payload but no property value was found in the payload. In OData, only "
                   "declared navigation properties and declared named streams can be represented as properties "
                   "without values.")

    @classmethod
    def bad_request(cls, message: str, code: str = "0x80040203") -> DataverseError:
        # 0x80040203 = InvalidArgument, the generic validation code; used where the reference names no code.
        return cls(400, code, message)

    @classmethod
    def syntax(cls, message: str) -> DataverseError:
        return cls(400, "0x80060888", message)

    # ---- §6 conditional operations and duplicates ------------------------------------------------------------
    @classmethod
    def does_not_exist(cls, logical: str, record_id: str, code: str = "0x80040217") -> DataverseError:
        # 0x80040217 = -2147220969 ObjectDoesNotExist (§7.1 SDK codes); §6 shows code "" for If-Match:* misses.
        return cls(404, code, f"{logical} With Id = {record_id} Does Not Exist")

    @classmethod
    def missing_bind_target(cls, logical: str, status: int = 400, code: str = "0x80040217") -> DataverseError:
        # A lookup bound to a record that does not exist: the real text (AleksandrRogov/DynamicsWebApi#179,
        # daryllabar/XrmUnitTest#115). Status and code are NOT VERIFIED: configurable (Options.missing_bind_status),
        # default 400 -- the stricter reading for a client that only re-plans on 404.
        return cls(status, code, f"A record with the specified key values does not exist in {logical} entity")

    @classmethod
    def duplicate_key(cls, status: int = 412) -> DataverseError:
        # Settled (audit dataverse-fidelity §2): 412, 0x80040237, "A record with matching key values already
        # exists." with innererror "Cannot insert duplicate key." (microsoft/coe-starter-kit#3624,
        # microsoft/powerapps-tools#574).
        return cls(status, "0x80040237", "A record with matching key values already exists.",
                   inner="Cannot insert duplicate key.")

    @classmethod
    def concurrency_not_enabled(cls, logical: str) -> DataverseError:
        # optimistic-concurrency.md: OptimisticConcurrencyNotEnabled -2147088243 (0x8006088d).
        return cls(400, "0x8006088d",
                   f"The entity {logical} does not have the IsOptimisticConcurrencyEnabled property set to true.")

    @classmethod
    def version_mismatch(cls) -> DataverseError:
        return cls(412, "", "The version of the existing record doesn't match the RowVersion property provided.")

    @classmethod
    def already_exists(cls) -> DataverseError:
        return cls(412, "", "A record with matching key values already exists.")

    @classmethod
    def attachment_too_big(cls) -> DataverseError:
        # §3: 0x80044a02 unManagedidsattachmentinvalidfilesize; status not documented -> 400.
        return cls(400, "0x80044a02", "Attachment file size is too big.")

    # ---- §9 / auth ---------------------------------------------------------------------------------------------
    @classmethod
    def unauthorized(cls, message: str = "Bearer token is missing or invalid.") -> DataverseError:
        return cls(401, "", message, {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    @classmethod
    def not_a_member(cls) -> DataverseError:
        # What Dataverse answers when the token's app has no application user (403, 0x80072560).
        return cls(403, "0x80072560", "The user is not a member of the organization.")

    @classmethod
    def cannot_act_on_behalf(cls) -> DataverseError:
        # CannotActOnBehalfOfAnotherUser = 0x8004A110 (-2147180272) in the web service error code list.
        return cls(403, "0x8004a110", "User does not have the privilege to act on behalf another user.")

    @classmethod
    def caller_not_found(cls, caller: str) -> DataverseError:
        return cls(404, "0x80040217", f"systemuser With Id = {caller} Does Not Exist")

    # ---- §7.2 service protection -------------------------------------------------------------------------------
    @classmethod
    def throttled_requests(cls, limit: int, window_s: int, retry_after: int) -> DataverseError:
        return cls(429, "0x80072322",
                   f"Number of requests exceeded the limit of {limit} over time window of {window_s} seconds.",
                   {"Retry-After": str(retry_after)})

    @classmethod
    def throttled_time(cls, limit_ms: int, window_s: int, retry_after: int) -> DataverseError:
        return cls(429, "0x80072321",
                   f"Combined execution time of incoming requests exceeded limit of {limit_ms:,} milliseconds over "
                   f"time window of {window_s} seconds. Decrease number of concurrent requests or reduce the "
                   "duration of requests and try again later.", {"Retry-After": str(retry_after)})

    @classmethod
    def throttled_concurrency(cls, limit: int, retry_after: int) -> DataverseError:
        return cls(429, "0x80072326", f"Number of concurrent requests exceeded the limit of {limit}.",
                   {"Retry-After": str(retry_after)})
