"""Idempotency-Key on the creating POSTs (app/idempotency.py): a repeat is answered again and
does nothing, a key names one request, a failure leaves the key free, keys expire and belong to
a tenant; and the client sends the key."""

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app import db
from app.auth import create_key
from app.client import AsyncDistillClient, DistillClient
from app.idempotency import IN_PROGRESS_LEASE_S
from app.jobs import service
from app.models import IdempotentRequest, KeyRole, utcnow
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.stacks import clear_caches
from tests.helpers.teachers import TeacherFiles


@pytest.fixture
def teacher_id(client: TestClient, digits_teacher: TeacherFiles) -> object:
    return upload_teacher(client, digits_teacher)["id"]


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def jobs_total(client: TestClient) -> int:
    total: int = client.get("/v1/jobs").json()["total"]
    return total


def problem_code(response: Any) -> str:
    """The problem+json ``code`` of a TestClient's response (of the httpx it runs on)."""
    assert response.headers["content-type"] == "application/problem+json", response.text
    code: str = response.json()["code"]
    return code


def multipart(boundary: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> bytes:
    """A multipart/form-data body written by hand, with the parts in the order given."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
        for name, (filename, content) in files.items()
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def small_npz(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return npz_bytes(x=rng.random((20, 4), dtype=np.float32), y=np.arange(20) % 3)


def test_a_repeated_job_is_answered_again_and_queued_once(
    client: TestClient, teacher_id: object
) -> None:
    first = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("job-1"))
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    again = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("job-1"))
    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert (
        again.headers["location"] == first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    )
    assert jobs_total(client) == 1
    # Without a key, or with another, a submission is a new job.
    assert client.post("/v1/jobs", json=job_body(teacher_id)).status_code == 202
    other = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("job-2"))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert jobs_total(client) == 3


def test_the_json_fingerprint_ignores_key_order_and_whitespace(
    client: TestClient, teacher_id: object
) -> None:
    body = job_body(teacher_id)
    first = client.post("/v1/jobs", json=body, headers=keyed("same-job"))
    assert first.status_code == 202, first.text
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=4)
    assert reordered.encode() != first.request.content
    again = client.post(
        "/v1/jobs",
        content=reordered,
        headers={**keyed("same-job"), "Content-Type": "application/json"},
    )
    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert jobs_total(client) == 1


def test_a_key_names_one_request_to_one_route(client: TestClient, teacher_id: object) -> None:
    assert client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("k")).is_success
    other_body = job_body(teacher_id, training={"epochs": 1})
    reused = client.post("/v1/jobs", json=other_body, headers=keyed("k"))
    assert (reused.status_code, problem_code(reused)) == (422, "idempotency_key_reused")
    other_route = client.post(
        "/v1/datasets", files={"file": ("d.npz", small_npz())}, headers=keyed("k")
    )
    assert (other_route.status_code, problem_code(other_route)) == (422, "idempotency_key_reused")
    assert "POST /v1/jobs" in other_route.json()["detail"]
    assert jobs_total(client) == 1
    uploaded = [d for d in client.get("/v1/datasets").json()["items"] if d["kind"] == "uploaded"]
    assert uploaded == []


def test_an_upload_is_recognized_whatever_its_multipart_boundary(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    onnx = digits_teacher.onnx.read_bytes()
    answers = []
    for boundary, fields in [("first-boundary", {"name": "t"}), ("0th3r", {"name": "t"})]:
        body = multipart(boundary, fields, {"file": ("teacher.onnx", onnx)})
        answers.append(
            client.post(
                "/v1/teachers",
                content=body,
                headers={
                    **keyed("teacher"),
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
            )
        )
    first, again = answers
    assert first.status_code == 201, first.text
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and first.json()["name"] == "t"
    assert len(client.get("/v1/teachers").json()["items"]) == 1
    # The same form built by httpx (its own boundary, the file first) is the same request too.
    same = client.post(
        "/v1/teachers",
        files={"file": ("teacher.onnx", onnx)},
        data={"name": "t"},
        headers=keyed("teacher"),
    )
    assert same.headers["idempotent-replayed"] == "true"
    # Other bytes, other file name, other field: another request.
    for files, data in [
        ({"file": ("teacher.onnx", onnx + b"\0")}, {"name": "t"}),
        ({"file": ("renamed.onnx", onnx)}, {"name": "t"}),
        ({"file": ("teacher.onnx", onnx)}, {"name": "u"}),
    ]:
        refused = client.post("/v1/teachers", files=files, data=data, headers=keyed("teacher"))
        assert (refused.status_code, problem_code(refused)) == (422, "idempotency_key_reused")
    assert len(client.get("/v1/teachers").json()["items"]) == 1


def test_a_dataset_upload_is_answered_again(client: TestClient) -> None:
    first = client.post("/v1/datasets", files={"file": ("d.npz", small_npz())}, headers=keyed("d"))
    assert first.status_code == 201, first.text
    again = client.post("/v1/datasets", files={"file": ("d.npz", small_npz())}, headers=keyed("d"))
    assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert again.json() == first.json()
    location = f"/v1/datasets/{first.json()['ref']}"
    assert first.headers["location"] == again.headers["location"] == location
    assert client.get(location).status_code == 200
    uploaded = [d for d in client.get("/v1/datasets").json()["items"] if d["kind"] == "uploaded"]
    assert [d["ref"] for d in uploaded] == [first.json()["ref"]]


def test_a_failed_request_leaves_its_key_free(client: TestClient, teacher_id: object) -> None:
    unknown = job_body("00000000-0000-0000-0000-000000000000")
    failed = client.post("/v1/jobs", json=unknown, headers=keyed("retry-me"))
    assert (failed.status_code, problem_code(failed)) == (422, "invalid_spec")
    invalid = client.post("/v1/jobs", json={"teacher": 3}, headers=keyed("retry-me"))
    assert (invalid.status_code, problem_code(invalid)) == (422, "validation_error")
    with db.session_scope() as session:
        assert session.scalars(select(IdempotentRequest)).all() == []
    fixed = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("retry-me"))
    assert fixed.status_code == 202 and "idempotent-replayed" not in fixed.headers
    again = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("retry-me"))
    assert again.headers["idempotent-replayed"] == "true"
    assert jobs_total(client) == 1


def test_an_expired_key_is_a_new_one(client: TestClient, teacher_id: object) -> None:
    first = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("old"))
    other = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("older"))
    assert first.status_code == other.status_code == 202
    with db.session_scope() as session:
        session.execute(update(IdempotentRequest).values(expires_at=utcnow() - timedelta(1)))
    again = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("old"))
    assert again.status_code == 202 and "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert jobs_total(client) == 3
    with db.session_scope() as session:
        rows = session.scalars(select(IdempotentRequest)).all()
        # The other expired key went with it; the new one lasts the TTL from now.
        assert [(row.key, row.status_code) for row in rows] == [("old", 202)]
        assert rows[0].expires_at > utcnow() + timedelta(hours=23)


def test_a_key_being_answered_is_a_409(client: TestClient, teacher_id: object) -> None:
    first = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("busy"))
    assert first.status_code == 202
    # As if the first request were still running: its row has no answer yet.
    with db.session_scope() as session:
        session.execute(update(IdempotentRequest).values(status_code=None, response=None))
    busy = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("busy"))
    assert (busy.status_code, problem_code(busy)) == (409, "idempotency_key_in_use")
    assert jobs_total(client) == 1
    # Another request under that key is still a 422.
    other_body = job_body(teacher_id, training={"epochs": 1})
    reused = client.post("/v1/jobs", json=other_body, headers=keyed("busy"))
    assert (reused.status_code, problem_code(reused)) == (422, "idempotency_key_reused")
    # Unanswered past the lease: its process died mid-request, and the key is free again.
    began = utcnow() - timedelta(seconds=IN_PROGRESS_LEASE_S + 60)
    with db.session_scope() as session:
        session.execute(update(IdempotentRequest).values(created_at=began))
    freed = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("busy"))
    assert freed.status_code == 202 and "idempotent-replayed" not in freed.headers
    assert jobs_total(client) == 2


def test_of_two_requests_at_once_with_a_new_key_one_does_the_work(
    client: TestClient, teacher_id: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    create_job = service.create_job

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return create_job(*args, **kwargs)

    monkeypatch.setattr(service, "create_job", held)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            client.post, "/v1/jobs", json=job_body(teacher_id), headers=keyed("race")
        )
        try:
            assert entered.wait(30)
            busy = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("race"))
        finally:
            release.set()
        answered = first.result()
    assert (busy.status_code, problem_code(busy)) == (409, "idempotency_key_in_use")
    assert answered.status_code == 202, answered.text
    again = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("race"))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == answered.json()["id"]
    assert jobs_total(client) == 1


@pytest.mark.parametrize("value", ["", "x" * 256, '"unterminated', '"bad \\escape"'])
def test_an_invalid_key_is_a_400(client: TestClient, teacher_id: object, value: str) -> None:
    refused = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed(value))
    assert (refused.status_code, problem_code(refused)) == (400, "invalid_idempotency_key")
    assert jobs_total(client) == 0


def test_a_quoted_key_is_the_bare_one(client: TestClient, teacher_id: object) -> None:
    first = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed('"k \\"1\\""'))
    assert first.status_code == 202, first.text
    again = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed('k "1"'))
    assert again.headers["idempotent-replayed"] == "true"
    long_key = client.post("/v1/jobs", json=job_body(teacher_id), headers=keyed("y" * 255))
    assert long_key.status_code == 202


@pytest.fixture
def two_tenants(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TestClient]]:
    from app.main import create_app

    monkeypatch.setenv("DISTILL_AUTH", "required")
    clear_caches()
    with db.session_scope() as session:
        keys = [create_key(session, name, KeyRole.ADMIN)[1] for name in ("team-a", "team-b")]
    app = create_app()
    yield [TestClient(app, headers={"Authorization": f"Bearer {key}"}) for key in keys]
    clear_caches()


def test_keys_belong_to_a_tenant(two_tenants: list[TestClient]) -> None:
    answers = [
        tenant.post("/v1/datasets", files={"file": ("d.npz", small_npz())}, headers=keyed("d"))
        for tenant in two_tenants
    ]
    assert [a.status_code for a in answers] == [201, 201]
    assert all("idempotent-replayed" not in a.headers for a in answers)
    assert answers[0].json()["ref"] != answers[1].json()["ref"]
    # B's other request under that key is no reuse of A's.
    b_other = two_tenants[1].post(
        "/v1/datasets", files={"file": ("d.npz", small_npz(1))}, headers=keyed("d")
    )
    assert (b_other.status_code, problem_code(b_other)) == (422, "idempotency_key_reused")
    again = two_tenants[0].post(
        "/v1/datasets", files={"file": ("d.npz", small_npz())}, headers=keyed("d")
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["ref"] == answers[0].json()["ref"]


def test_the_clients_send_the_key(
    client: TestClient, digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    npz = tmp_path / "d.npz"
    npz.write_bytes(small_npz())

    def in_process(request: httpx.Request) -> httpx.Response:
        """The request, answered by the in-process app (the TestClient is on another httpx)."""
        answer = client.request(
            request.method, str(request.url), headers=request.headers, content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    transport = httpx.MockTransport(in_process)
    with DistillClient("http://testserver", transport=transport) as distill:
        teachers = [distill.upload_teacher(digits_teacher.onnx, idempotency_key="t") for _ in "ab"]
        datasets = [distill.upload_dataset(npz, idempotency_key="d") for _ in "ab"]
        jobs = [distill.submit_job(job_body(teachers[0].id), idempotency_key="j") for _ in "ab"]
    assert teachers[0].id == teachers[1].id and datasets[0].ref == datasets[1].ref
    assert jobs[0].id == jobs[1].id

    async def submit_twice() -> list[str]:
        async with AsyncDistillClient(
            "http://testserver", transport=httpx.ASGITransport(app=client.app)
        ) as distill:
            body = job_body(teachers[0].id, training={"epochs": 2})
            return [(await distill.submit_job(body, idempotency_key="aj")).id for _ in "ab"]

    async_jobs = asyncio.run(submit_twice())
    assert async_jobs[0] == async_jobs[1]
    assert jobs_total(client) == 2


def test_a_large_body_a_form_route_does_not_take_is_not_read(client: TestClient) -> None:
    """A 2 MiB JSON body to an upload route, with a key: refused by the route (it takes a
    form), the key left free, the body never read for a fingerprint."""
    body = b'{"x": "' + b"a" * (2 << 20) + b'"}'
    headers = {**keyed("json-upload"), "Content-Type": "application/json"}
    refused = client.post("/v1/teachers", content=body, headers=headers)
    assert refused.status_code == 422, refused.text
    with db.session_scope() as session:
        assert session.scalars(select(IdempotentRequest)).all() == []
