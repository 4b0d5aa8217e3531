"""`baton serve` starts the cluster on a daemon thread (``router.server._in_daemon_thread``).
Ray forks its GCS and raylet with PR_SET_PDEATHSIG, which fires when the forking *thread*
exits: the thread must outlive the call, or the embedded Ray is SIGKILLed right after it
starts (and the server exits a minute later). A real child process with that signal set
stands in for Ray's."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
import sys
import time

import pytest

from router.server import _in_daemon_thread

PR_SET_PDEATHSIG = 1


def _die_with_parent_thread() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_child_forked_on_the_start_thread_survives_the_call() -> None:
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"], preexec_fn=_die_with_parent_thread)

    child = asyncio.run(_in_daemon_thread(start))
    try:
        time.sleep(1.0)  # a returned thread's death signal arrives at once
        assert child.poll() is None, f"the child died with {child.returncode}"
    finally:
        child.kill()
        child.wait(10)
