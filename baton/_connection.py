"""What the sync and asyncio clients share: credentials, call metadata, deadlines and the
retry policy.

Retries: only UNAVAILABLE (the server is unreachable, or no instance is serving) is
retried, with exponential backoff and jitter, and a stream only until it has yielded its
first chunk: after that the tokens were already seen, and a second run would repeat or
contradict them. Every retry stays within the call's one deadline.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any, Union

import grpc

from baton.errors import DeadlineExceeded

DEFAULT_TIMEOUT_S = 300.0  # a call's deadline when neither the call nor the client sets one
# True: the system's root certificates; a str or path: a CA bundle (PEM) to trust.
TLS = Union[bool, str, "os.PathLike[str]", grpc.ChannelCredentials, None]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # the first try included; 1 disables retries
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("initial_backoff_s: must be in [0, max_backoff_s]")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier}")

    def backoff_s(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based): full jitter, so
        that many clients retrying at once spread out."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(cap / 2, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


class Deadline:
    """One call's deadline, shared by its retries."""

    def __init__(self, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline of {self.timeout_s:g} s exceeded")
        return left


def retry_delay(
    policy: RetryPolicy, attempt: int, err: grpc.RpcError, deadline: Deadline
) -> float | None:
    """The pause before the next attempt, or None to give up with ``err``."""
    code = err.code() if hasattr(err, "code") else None
    if code != grpc.StatusCode.UNAVAILABLE or attempt >= policy.max_attempts:
        return None
    delay = policy.backoff_s(attempt)
    try:
        left = deadline.remaining()
    except DeadlineExceeded:
        return None
    return delay if delay < left else None  # no time left for another try


def channel_credentials(tls: TLS) -> grpc.ChannelCredentials | None:
    """None for a plaintext channel."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, os.PathLike)):
        with open(tls, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    raise TypeError(
        f"tls: must be True, a CA file path or grpc.ChannelCredentials, got {type(tls).__name__}"
    )


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return () if api_key is None else (("authorization", f"Bearer {api_key}"),)


@dataclass(frozen=True)
class ConnectionConfig:
    """What a client was made with, checked once."""

    target: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float
    retry: RetryPolicy
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def make(
        cls,
        target: str,
        api_key: str | None,
        tls: TLS,
        timeout: float | None,
        retry: RetryPolicy | None,
        options: dict[str, Any] | None,
    ) -> ConnectionConfig:
        timeout_s = DEFAULT_TIMEOUT_S if timeout is None else timeout
        Deadline(timeout_s)  # validates it
        return cls(
            target,
            channel_credentials(tls),
            call_metadata(api_key),
            timeout_s,
            retry or RetryPolicy(),
            tuple((options or {}).items()),
        )

    def deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout_s if timeout is None else timeout)
