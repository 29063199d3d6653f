"""Hostile input (issue 12, cases 9 and 10), on both stacks: text no database column holds, in
every place a request carries text; the staging folder after refused uploads; deleting a teacher
while a job is submitted on it; offsets past any page; the errors the OpenAPI document promises;
405's ``Allow``."""

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import db
from app.config import get_settings
from app.models import Job, JobTeacher, Teacher
from app.storage import ArtifactStore
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles

PROBLEM_JSON = "application/problem+json"
BOUNDARY = "hostile-input-boundary"


def staging() -> Path:
    return get_settings().resolved_storage_dir / "staging"


def staged_files() -> list[Path]:
    return sorted(staging().glob("*")) if staging().is_dir() else []


def kept_files() -> set[Path]:
    """Every file and folder under the store's teachers and datasets."""
    root = get_settings().resolved_storage_dir
    return {p for folder in ("teachers", "datasets") for p in (root / folder).rglob("*")}


def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body written by hand: clients escape a NUL in a file name, a hostile one need
    not."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value.encode()
        + b"\r\n"
        for name, value in fields.items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def assert_problem(response: httpx.Response, status: int, code: str, field: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["status"], body["code"], body["field"]) == (status, code, field), body
    assert "U+0000" in body["detail"] or "U+D800" in body["detail"], body


@pytest.fixture
def teacher_id(client: TestClient, digits_teacher: TeacherFiles) -> object:
    return upload_teacher(client, digits_teacher)["id"]


# --- Case 9: text a database column cannot hold ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/v1/jobs/a%00b", "job_id"),
        ("GET", "/v1/jobs/a%00b/metrics", "job_id"),
        ("POST", "/v1/jobs/a%00b/cancel", "job_id"),
        ("GET", "/v1/jobs/a%00b/artifact", "job_id"),
        ("POST", "/v1/jobs/a%00b/predict", "job_id"),
        ("GET", "/v1/teachers/a%00b", "teacher_id"),
        ("DELETE", "/v1/teachers/a%00b", "teacher_id"),
        ("GET", "/v1/datasets/a%00b", "ref"),
    ],
)
def test_a_path_id_holding_nul_names_nothing(
    client: TestClient, method: str, path: str, field: str
) -> None:
    body = {"inputs": [[0.0]]} if path.endswith("/predict") else None
    assert_problem(client.request(method, path, json=body), 404, "not_found", field)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"teacher": "a\x00b"}, "teacher"),
        ({"dataset": "x\x00"}, "dataset"),
        ({"teacher": None, "teachers": [{"id": "a\x00"}, {"id": "b"}]}, "teachers.0.id"),
    ],
)
def test_a_job_spec_holding_nul_is_refused(
    client: TestClient, teacher_id: object, overrides: dict[str, object], field: str
) -> None:
    response = client.post("/v1/jobs", json=job_body(teacher_id, **overrides))
    assert_problem(response, 422, "invalid_input", field)
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_lone_surrogate_in_a_job_spec_is_refused(client: TestClient, teacher_id: object) -> None:
    # Clients cannot encode a lone surrogate: write its escape into the JSON text.
    body = json.dumps(job_body(teacher_id, dataset="x?")).replace("x?", "x\\ud800")
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 422, "invalid_input", "dataset")


def test_nul_in_a_key_or_deep_in_a_body_is_found(client: TestClient, teacher_id: object) -> None:
    response = client.post("/v1/jobs", json={**job_body(teacher_id), "extra\x00": 1})
    assert_problem(response, 422, "invalid_input", "extra\ufffd")
    deep: object = "\x00"
    for _ in range(500):
        deep = [deep]
    response = client.post("/v1/jobs", json=job_body(teacher_id, training=deep))
    assert_problem(response, 422, "invalid_input", "training" + ".0" * 500)


def test_a_query_value_holding_nul_is_refused(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs?status=queued%00"), 422, "invalid_input", "status")


def digits_npz() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.random((40, 1, 8, 8), dtype=np.float32), y=np.arange(40) % 4)


@pytest.mark.parametrize(
    ("route", "fields", "filename", "field"),
    [
        ("/v1/teachers", {"name": "a\x00b"}, "teacher.onnx", "name"),
        ("/v1/teachers", {"output": "logits\x00"}, "teacher.onnx", "output"),
        ("/v1/teachers", {"config": '{"a\x00": 1}'}, "teacher.onnx", "config"),
        ("/v1/teachers", {"classes": '["a\x00"]'}, "teacher.onnx", "classes"),
        ("/v1/teachers", {}, "tea\x00cher.onnx", "file"),
        ("/v1/datasets", {"name": "a\x00b"}, "data.npz", "name"),
        ("/v1/datasets", {"classes": '["a\x00", "b", "c", "d"]'}, "data.npz", "classes"),
        ("/v1/datasets", {}, "da\x00ta.npz", "file"),
    ],
)
def test_an_upload_holding_nul_is_refused_and_leaves_nothing_staged(
    client: TestClient,
    digits_teacher: TeacherFiles,
    route: str,
    fields: dict[str, str],
    filename: str,
    field: str,
) -> None:
    data = digits_teacher.onnx.read_bytes() if route == "/v1/teachers" else digits_npz()
    content, headers = multipart(fields, filename, data)
    response = client.post(route, content=content, headers=headers)
    assert_problem(response, 422, "invalid_input", field)
    assert staged_files() == []
    listed = client.get(route).json()["items"]
    assert [item for item in listed if item.get("kind", "uploaded") == "uploaded"] == []


@pytest.fixture
def failing_client(client: TestClient) -> Iterator[TestClient]:
    """The same app, answering a 500 instead of raising in the test."""
    with TestClient(client.app, raise_server_exceptions=False, headers=client.headers) as failing:
        yield failing


@pytest.mark.parametrize("route", ["/v1/teachers", "/v1/datasets"])
@pytest.mark.parametrize("stage", ["adopt", "response"])
def test_an_upload_failing_after_staging_leaves_no_file(
    failing_client: TestClient,
    digits_teacher: TeacherFiles,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    stage: str,
) -> None:
    """Unexpected failures too: before the staged file is adopted (it is removed), or after, when
    the request's transaction rolls back (the adopted file goes with its row)."""

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk on fire")

    if stage == "adopt":
        monkeypatch.setattr(ArtifactStore, "adopt", fail)
    else:
        schemas = "app.teachers.router.TeacherOut" if route == "/v1/teachers" else None
        if schemas is None:
            monkeypatch.setattr("app.datasets.service.uploaded_out", fail)
        else:
            monkeypatch.setattr(f"{schemas}.model_validate", fail)
    data = digits_teacher.onnx.read_bytes() if route == "/v1/teachers" else digits_npz()
    filename = "teacher.onnx" if route == "/v1/teachers" else "data.npz"
    before = kept_files()
    response = failing_client.post(route, files={"file": (filename, data)})
    assert response.status_code == 500, response.text
    assert staged_files() == []
    assert kept_files() == before


def test_stale_staged_files_are_removed_when_the_api_starts(stack: Stack) -> None:
    from app.main import create_app

    staging().mkdir(parents=True, exist_ok=True)
    stale, fresh = staging() / "tmp-stale", staging() / "tmp-fresh"
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"being received by another process")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    with TestClient(create_app()) as client:
        assert client.get("/healthz").status_code == 200
    assert staged_files() == [fresh]
    fresh.unlink()


# --- Case 9: deleting a teacher while a job is submitted on it ----------------------------------


def test_deleting_a_teacher_while_a_job_is_submitted_on_it(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    """30 pairs at once: each pair either keeps its teacher (202 and 409) or loses it (204 and
    422); never a 5xx, never a job on a deleted teacher."""
    pairs = 30
    ids = [str(upload_teacher(client, digits_teacher)["id"]) for _ in range(pairs)]
    start = threading.Barrier(2 * pairs)

    def delete(teacher_id: str) -> httpx.Response:
        start.wait()
        response: httpx.Response = client.delete(f"/v1/teachers/{teacher_id}")
        return response

    def submit(teacher_id: str) -> httpx.Response:
        start.wait()
        response: httpx.Response = client.post("/v1/jobs", json=job_body(teacher_id))
        return response

    with ThreadPoolExecutor(2 * pairs) as pool:
        deletes = [pool.submit(delete, t) for t in ids]
        submits = [pool.submit(submit, t) for t in ids]
        outcomes = [
            (s.result().status_code, d.result().status_code)
            for s, d in zip(submits, deletes, strict=True)
        ]
    assert set(outcomes) <= {(202, 409), (422, 204)}, outcomes
    for (submitted, _), future in zip(outcomes, submits, strict=True):
        body = future.result().json()
        if submitted == 422:
            assert (body["code"], body["field"]) == ("invalid_spec", "teacher"), body
    with db.session_scope() as session:
        teachers = set(session.scalars(select(Teacher.id)))
        jobs = list(session.scalars(select(Job)))
        links = {row.job_id: row.teacher_id for row in session.scalars(select(JobTeacher))}
    assert len(jobs) == outcomes.count((202, 409))
    for job in jobs:
        assert job.teacher_id in teachers and links[job.id] == job.teacher_id
    assert len(teachers) == len(jobs)


# --- Case 10: offsets, documented errors, 405 ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), [("offset", 10**20), ("offset", 2**31), ("limit", 10**20)]
)
def test_a_huge_page_parameter_is_a_422(client: TestClient, name: str, value: int) -> None:
    response = client.get("/v1/jobs", params={name: value})
    assert response.status_code == 422, response.text
    assert (response.json()["code"], response.json()["field"]) == ("validation_error", name)


def test_the_largest_offset_is_an_empty_page(client: TestClient) -> None:
    page = client.get("/v1/jobs", params={"offset": 2**31 - 1}).json()
    assert (page["items"], page["offset"]) == ([], 2**31 - 1)


def test_openapi_documents_the_problems_each_operation_gives(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    assert {"type", "title", "status", "detail", "code"} <= set(
        document["components"]["schemas"]["Problem"]["required"]
    )
    assert "HTTPValidationError" not in document["components"]["schemas"]
    documented: dict[tuple[str, str], set[int]] = {}
    protocol_error = {"schema": {"$ref": "#/components/schemas/ProtocolError"}}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = {int(s): r for s, r in operation["responses"].items() if s.startswith("4")}
            if path.startswith("/v2"):  # the Open Inference Protocol's own error shape
                assert all(
                    r["content"] == {"application/json": protocol_error} for r in errors.values()
                )
                assert 400 in errors and ("{" in path) == (404 in errors), (method, path)
                continue
            for status, response in errors.items():
                assert response["content"] == {PROBLEM_JSON: problem}, (method, path, status)
            assert 422 in errors, (method, path)
            assert ("{" in path) == (404 in errors), (method, path)
            assert ("requestBody" in operation) == (413 in errors), (method, path)
            documented[method.upper(), path] = set(errors)
    assert {409} <= documented["DELETE", "/v1/teachers/{teacher_id}"]
    assert {413, 415, 422} <= documented["POST", "/v1/teachers"]
    assert {409} <= documented["POST", "/v1/jobs/{job_id}/cancel"]
    assert {409} <= documented["GET", "/v1/jobs/{job_id}/artifact"]
    assert {404, 409, 413} <= documented["POST", "/v1/jobs/{job_id}/predict"]
    assert {413} <= documented["POST", "/v1/datasets"]
    assert "503" in document["paths"]["/v1/jobs"]["post"]["responses"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/jobs", "GET, HEAD, POST"),
        ("PUT", "/v1/jobs/some-id", "DELETE, GET, HEAD"),
        ("GET", "/v1/jobs/some-id/cancel", "POST"),
        ("PATCH", "/v1/teachers/some-id", "DELETE, GET, HEAD"),
        ("DELETE", "/v1/datasets", "GET, HEAD, POST"),
    ],
)
def test_405_says_which_methods_are_allowed(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed
