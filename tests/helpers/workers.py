"""Real Celery worker processes for end-to-end tests, and waiting on a job over HTTP."""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.cli import worker_command
from tests.helpers.stacks import REDIS_URL, Stack

StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(stack: Stack, tmp_path: Path) -> Iterator[StartWorker]:
    """Start real `celery worker` processes on the stack's broker; all are stopped afterwards."""
    if stack.name == "server":
        redis.Redis.from_url(REDIS_URL).flushdb()
    else:
        for message in (stack.home / "broker").glob("*.msg"):
            message.unlink()
    workers: list[subprocess.Popen[bytes]] = []

    def start(beat: bool = False, **env: str) -> subprocess.Popen[bytes]:
        command = worker_command(concurrency=1, beat=beat)
        log = open(tmp_path / f"worker-{len(workers)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append(process)
        return process

    yield start
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in workers:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    for log_file in sorted(tmp_path.glob("worker-*.log")):
        print(f"--- {log_file.name}\n{log_file.read_text()[-3000:]}")


def wait_for(
    client: TestClient, job_id: str, done: Callable[[dict[str, object]], bool], timeout: float = 120
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job}")


def is_terminal(job: dict[str, object]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")
