"""The SDK's exceptions: one class per gRPC status a caller may want to tell apart.

Every failed call raises a :class:`BatonError`; :data:`ERRORS_BY_CODE` is the one table
from a gRPC status code to the class raised (codes not in it raise ``BatonError``
itself). The server starts a client mistake's message with the request field at fault
("temperature: must be >= 0, got -1.0"); :attr:`BatonError.field` reads it back.
"""

from __future__ import annotations

import re

import grpc

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class BatonError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        # A subclass raised by the SDK itself (a prompt it cannot encode) takes its code
        # from the table.
        self.code = code or _CODE_OF.get(type(self), grpc.StatusCode.UNKNOWN)

    @property
    def field(self) -> str | None:
        """The request field at fault, when the message names one."""
        match = _FIELD.match(self.message)
        return match.group(1) if match else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class InvalidArgument(BatonError):
    """The request is wrong (a sampling parameter, the prompt, the model name)."""


class NotFound(BatonError):
    pass


class Unauthenticated(BatonError):
    """No api key, or the wrong one."""


class ResourceExhausted(BatonError):
    pass


class Unavailable(BatonError):
    """No instance is serving, or the server cannot be reached (retried before the
    first token, up to the client's retry policy)."""


class DeadlineExceeded(BatonError):
    pass


class Cancelled(BatonError):
    pass


class Internal(BatonError):
    """A fault of the server, never of the request."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[BatonError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}

_CODE_OF = {cls: code for code, cls in ERRORS_BY_CODE.items()}


def error_from_code(code: grpc.StatusCode, message: str) -> BatonError:
    return ERRORS_BY_CODE.get(code, BatonError)(message, code)


def from_rpc_error(err: grpc.RpcError) -> BatonError:
    """The exception for a failed gRPC call (sync or asyncio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else None
    return error_from_code(code, details or code.name)
