"""`distill up` as a user runs it: one command brings up the API and a worker, and Ctrl-C (or a
SIGINT from a script) takes them all down, also when the shell started it in the background."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def ignore_sigint() -> None:
    """What a non-interactive shell does to a job it starts with `&`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def session_processes(session: int) -> list[str]:
    """The command lines of the processes still in ``session``."""
    found = subprocess.run(
        ["pgrep", "-a", "-s", str(session)], capture_output=True, text=True, check=False
    )
    return found.stdout.splitlines()


def test_up_stops_on_sigint_even_when_started_in_the_background(tmp_path: Path) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISTILL_DATABASE_URL", "DISTILL_BROKER_URL")
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env={**env, "DISTILL_HOME": str(tmp_path / "home")},
        preexec_fn=ignore_sigint,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert up.poll() is None, "distill up exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("distill up did not become ready in 120 s")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0, "distill up did not exit cleanly on SIGINT"
        # Its API and worker went with it: nothing answers, nothing of the session is left.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz")
        left = session_processes(up.pid)
        deadline = time.monotonic() + 30
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = session_processes(up.pid)
        assert left == [], f"processes of distill up's session still running: {left}"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
