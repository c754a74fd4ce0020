"""Registry errors: every one derives from :class:`kvxfer.errors.RegistryError`.

Layer: registry. Each error has a stable :class:`ErrorCode` so that a refusal made by the
embedded server or by a Redis script reaches the caller as the same exception class.
"""

from __future__ import annotations

from enum import Enum

from ..errors import RegistryError

__all__ = [
    "ErrorCode",
    "RegistryUnavailableError",
    "RegistryAuthError",
    "RegistryTimeoutError",
    "UnknownRequestError",
    "UnknownConnectorError",
    "DuplicateRequestError",
    "AlreadyClaimedError",
    "NameTakenError",
    "NotAPartyError",
    "RequestFailedError",
    "InvalidRequestError",
    "error_from_code",
]


class ErrorCode(Enum):
    """Why the registry refused an operation (the value travels on the wire)."""

    UNAVAILABLE = "unavailable"
    AUTH = "auth"
    TIMEOUT = "timeout"
    UNKNOWN_REQUEST = "unknown_request"
    UNKNOWN_CONNECTOR = "unknown_connector"
    DUPLICATE = "duplicate"
    ALREADY_CLAIMED = "already_claimed"
    NAME_TAKEN = "name_taken"
    NOT_A_PARTY = "not_a_party"
    REQUEST_FAILED = "request_failed"
    INVALID = "invalid"


class _Coded(RegistryError):
    code: ErrorCode = ErrorCode.INVALID


class RegistryUnavailableError(_Coded):
    """The registry cannot be reached, or the connection to it was lost (e.g. it restarted)."""

    code = ErrorCode.UNAVAILABLE


class RegistryAuthError(_Coded):
    """The registry refused this client's token."""

    code = ErrorCode.AUTH


class RegistryTimeoutError(_Coded, TimeoutError):
    """A wait on the registry (publication, expectation) ran past its timeout."""

    code = ErrorCode.TIMEOUT


class UnknownRequestError(_Coded, KeyError):
    """No live entry has this request id (never published, finished, expired or cancelled)."""

    code = ErrorCode.UNKNOWN_REQUEST

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownConnectorError(_Coded, KeyError):
    """No connector of this name holds a lease (never registered, or its lease expired)."""

    code = ErrorCode.UNKNOWN_CONNECTOR

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateRequestError(_Coded):
    """A request with this id is already published or expected."""

    code = ErrorCode.DUPLICATE


class AlreadyClaimedError(_Coded):
    """Another consumer (or producer, in push mode) already took this request: exactly once."""

    code = ErrorCode.ALREADY_CLAIMED


class NameTakenError(_Coded):
    """Another live connector instance holds this name."""

    code = ErrorCode.NAME_TAKEN


class NotAPartyError(_Coded):
    """The caller is neither the producer nor the consumer of the request, or acts out of turn."""

    code = ErrorCode.NOT_A_PARTY


class RequestFailedError(_Coded):
    """The request ended while waited on: expired, cancelled, failed, or a party was lost."""

    code = ErrorCode.REQUEST_FAILED


class InvalidRequestError(_Coded, ValueError):
    """An argument is out of range (empty id, negative ttl, bad block id ...)."""

    code = ErrorCode.INVALID


_BY_CODE: dict[ErrorCode, type[_Coded]] = {
    cls.code: cls
    for cls in (RegistryUnavailableError, RegistryAuthError, RegistryTimeoutError, UnknownRequestError,
                UnknownConnectorError, DuplicateRequestError, AlreadyClaimedError, NameTakenError,
                NotAPartyError, RequestFailedError, InvalidRequestError)
}


def error_from_code(code: ErrorCode, message: str) -> RegistryError:
    """The exception instance for a wire error code."""
    return _BY_CODE[code](message)


def code_of(exc: RegistryError) -> ErrorCode:
    """The wire code of a registry error (INVALID for a plain RegistryError)."""
    return getattr(exc, "code", ErrorCode.INVALID)
