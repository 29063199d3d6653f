"""A burst of concurrent requests against a real uvicorn server, on both stacks: no request may
fail with a 5xx (on SQLite, a writer whose commit waited for a thread that the waiting readers
held used to freeze everything for 30 s, then answer 500 `database is locked`)."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers.api import job_body, upload_teacher
from tests.helpers.servers import serving
from tests.helpers.stacks import key_headers
from tests.helpers.teachers import TeacherFiles

SUBMISSIONS, POLLERS = 50, 10


@pytest.fixture
def server_url(client: TestClient) -> Iterator[str]:
    """The app served by uvicorn in a thread (the `client` fixture migrates and cleans up)."""
    from app.main import create_app

    with serving(create_app()) as address:
        yield f"http://{address}"


def test_a_burst_of_submissions_and_polls_gets_no_5xx(
    client: TestClient, server_url: str, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"])

    def submit(_: int) -> int:
        with httpx.Client(base_url=server_url, headers=key_headers(), timeout=120) as http:
            return http.post("/v1/jobs", json=body).status_code

    def poll(_: int) -> list[int]:
        with httpx.Client(base_url=server_url, headers=key_headers(), timeout=120) as http:
            return [http.get("/v1/jobs", params={"limit": 50}).status_code for _ in range(10)]

    started = time.monotonic()
    with ThreadPoolExecutor(SUBMISSIONS + POLLERS) as pool:
        submitted = pool.map(submit, range(SUBMISSIONS))
        polled = pool.map(poll, range(POLLERS))
        statuses = list(submitted) + [s for statuses in polled for s in statuses]
    elapsed = time.monotonic() - started
    print(f"{len(statuses)} requests in {elapsed:.1f} s: {sorted(set(statuses))}")
    assert statuses.count(202) == SUBMISSIONS
    assert all(s < 500 for s in statuses)
    assert client.get("/v1/jobs").json()["total"] == SUBMISSIONS
