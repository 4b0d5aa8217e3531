"""``cluster.admission`` alone: the bounded, asynchronous wait for a serving instance
(the real cluster path runs in tests/cluster/test_admission.py) and the serve flags."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.admission import NoInstanceServing, check_timeout, when_serving, when_serving_sync
from cluster.cli import main


class Flaky:
    """Raises NoInstanceServing ``n`` times, then answers."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise NoInstanceServing("cluster: no instance is serving right now")
        return "sent"


def test_it_sends_once_an_instance_serves_without_blocking_the_loop() -> None:
    async def run() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        got = await when_serving(Flaky(5), timeout_s=10, poll_s=0.02)
        t.cancel()
        return got, ticks

    got, ticks = asyncio.run(run())
    assert got == "sent"
    assert ticks >= 5  # the loop ran other tasks while the request waited
    assert when_serving_sync(Flaky(2), timeout_s=10, poll_s=0.01) == "sent"


def test_past_the_timeout_it_fails_naming_the_wait() -> None:
    flaky = Flaky(10**9)
    t = time.monotonic()
    with pytest.raises(NoInstanceServing, match=r"no instance is serving .*waited 0.2 s"):
        asyncio.run(when_serving(flaky, timeout_s=0.2, poll_s=0.02))
    assert time.monotonic() - t >= 0.2 and flaky.calls > 1
    with pytest.raises(NoInstanceServing, match="waited 0 s"):
        when_serving_sync(Flaky(10**9), timeout_s=0)


def test_other_errors_are_not_retried() -> None:
    def bad() -> None:
        raise ValueError("max_tokens: must be >= 1")

    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(when_serving(bad, timeout_s=10))


def test_a_cancelled_wait_ends_at_once() -> None:
    async def run() -> None:
        task = asyncio.create_task(when_serving(Flaky(10**9), timeout_s=60, poll_s=0.02))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_bad_timeouts_are_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (-1, "3", True, float("nan")):
        with pytest.raises(ValueError, match="admission-timeout: must be"):
            check_timeout(bad)
    assert check_timeout(0) == 0.0
    assert main(["serve", "--admission-timeout", "-1"]) == 2
    assert "admission-timeout: must be a number of seconds >= 0, got -1.0" in (
        capsys.readouterr().err
    )
    assert main(["serve", "--health-interval", "0"]) == 2
    assert "health-interval: must be > 0 seconds, got 0.0" in capsys.readouterr().err
