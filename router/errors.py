"""Errors as values, and the one table that maps them to gRPC and HTTP.

Anything the router refuses or fails becomes a :class:`RouterError` with a kind, a
message, and (for a client's mistake) the request field at fault. The gRPC servicer and
the HTTP handlers both translate through :data:`ERROR_TABLE`, so a given mistake gets
the same answer on both APIs. A client's mistake is never INTERNAL or a 500.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorMapping:
    grpc_code: str  # a grpc.StatusCode member name
    http_status: int
    openai_type: str  # the "type" of an OpenAI-style error body


ERROR_TABLE: dict[ErrorKind, ErrorMapping] = {
    ErrorKind.INVALID_ARGUMENT: ErrorMapping("INVALID_ARGUMENT", 400, "invalid_request_error"),
    ErrorKind.NOT_FOUND: ErrorMapping("NOT_FOUND", 404, "not_found_error"),
    ErrorKind.UNAUTHENTICATED: ErrorMapping("UNAUTHENTICATED", 401, "authentication_error"),
    ErrorKind.RESOURCE_EXHAUSTED: ErrorMapping("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: ErrorMapping("UNAVAILABLE", 503, "service_unavailable_error"),
    ErrorKind.DEADLINE_EXCEEDED: ErrorMapping("DEADLINE_EXCEEDED", 504, "timeout_error"),
    ErrorKind.CANCELLED: ErrorMapping("CANCELLED", 499, "cancelled_error"),
    ErrorKind.INTERNAL: ErrorMapping("INTERNAL", 500, "internal_error"),
}

# ValueErrors from the engine and the cluster read "field: what is wrong".
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


@dataclass
class RouterError(Exception):
    kind: ErrorKind
    message: str
    param: str | None = None  # the request field at fault, when there is one

    def __str__(self) -> str:
        return self.message

    @property
    def mapping(self) -> ErrorMapping:
        return ERROR_TABLE[self.kind]

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> RouterError:
        """A client's mistake; the field is read from the message when not given."""
        if param is None:
            match = _FIELD.match(message)
            param = match.group(1) if match else None
        return cls(ErrorKind.INVALID_ARGUMENT, message, param)
