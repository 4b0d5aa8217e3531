"""A second SIGTERM while `baton serve` drains a long request exits at once, without
waiting for the drain, and leaves none of its embedded Ray's processes behind."""

from __future__ import annotations

import signal
import time

import baton
from tests.serve_proc import ServeProcess


def test_a_second_sigterm_while_draining_exits_at_once() -> None:
    served = ServeProcess("--shutdown-timeout", "600", "--num-kv-blocks", "512")
    try:
        params = baton.SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
        with baton.Client(served.grpc) as client:
            stream = client.stream("Count slowly:", params)
            next(iter(stream))  # the request is running on the decode instance
            served.proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            # Draining: the long request keeps it up (the timeout is 600 s).
            assert served.proc.poll() is None, served.tail()
            sent = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            code = served.proc.wait(30)
            waited = time.monotonic() - sent
        assert code == 128 + signal.SIGTERM
        assert waited < 30
        served.settle_output()
        assert "SIGTERM again, exiting without draining" in served.text
    finally:
        if served.proc.poll() is None:
            served.kill()
        # Nothing of its Ray is left behind in its session (the workers die with it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and served.session_pids():
            time.sleep(0.5)
        assert not served.session_pids(), "processes of the killed serve are left"
