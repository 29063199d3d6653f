"""API keys and tenants (issue 13), on both stacks with keys required: every route but health
needs a key (401 without one, with ``WWW-Authenticate``), and a tenant's key finds nothing of
another tenant's on any route (404, as for an id that does not exist), lists none of it, and
changes none of it. The routes are read from the app's own OpenAPI document, so a route added
later is checked too."""

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import db
from app.auth import create_key, revoke_key
from app.config import get_settings
from app.datasets.loading import load_builtin
from app.models import Job, KeyRole
from app.storage import get_store, keys
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.stacks import Stack, clear_caches
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job

# Operations that answer without a key: health probes and the dashboard's static files (which
# hold no data; the pages send the key the user enters).
PUBLIC = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/v2/health/live"),
    ("get", "/v2/health/ready"),
}
PIXELS = [[[0.5] * 8] * 8]  # one digits image, [1, 8, 8]
NO_SUCH_ID = "00000000-0000-0000-0000-000000000000"
V2_BODY = {
    "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]
}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/jobs/{job_id}/predict"): {"inputs": [PIXELS]},
    ("put", "/v1/jobs/{job_id}/alias"): {"alias": "taken-by-b"},
    ("post", "/v2/models/{name}/infer"): V2_BODY,
    ("post", "/v2/models/{name}/versions/{version}/infer"): V2_BODY,
}


@dataclass(frozen=True)
class Tenants:
    """Tenant A's objects, and clients for A (admin and member keys) and B."""

    a: TestClient
    a_member: TestClient
    b: TestClient
    anonymous: TestClient
    params: dict[str, str]  # path parameter -> one of A's objects
    queued_job: str
    keys: dict[str, str]


@pytest.fixture
def tenants(
    stack: Stack,
    client: TestClient,
    digits_teacher: TeacherFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Tenants]:
    from app.main import create_app

    monkeypatch.setenv("DISTILL_AUTH", "required")
    clear_caches()
    with db.session_scope() as session:
        made = {
            "a": create_key(session, "team-a", KeyRole.ADMIN)[1],
            "a_member": create_key(session, "team-a", KeyRole.MEMBER)[1],
            "b": create_key(session, "team-b", KeyRole.ADMIN)[1],
        }
    app = create_app()
    clients = {
        name: TestClient(app, headers={"Authorization": f"Bearer {key}"})
        for name, key in made.items()
    }
    a = clients["a"]
    teacher = str(upload_teacher(a, digits_teacher)["id"])
    digits = load_builtin("builtin:digits")
    assert digits.x_test is not None and digits.y_test is not None
    response = a.post(
        "/v1/datasets",
        files={"file": ("a.npz", npz_bytes(x=digits.x_test, y=digits.y_test))},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()["ref"]
    job, queued = (a.post("/v1/jobs", json=job_body(teacher)).json()["id"] for _ in range(2))
    run_job(job)
    assert a.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
    assert a.put(f"/v1/jobs/{job}/alias", json={"alias": "digits"}).status_code == 200
    params = {
        "teacher_id": teacher,
        "ref": dataset,
        "job_id": job,
        "name": "digits",
        "version": "1",
    }
    yield Tenants(a, clients["a_member"], clients["b"], TestClient(app), params, queued, made)
    clear_caches()


def operations(app_client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    document = app_client.get("/openapi.json").json()
    return [
        (method, path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


def call(client: TestClient, method: str, path: str, params: dict[str, str]) -> Any:
    url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], path)
    body = BODIES.get((method, path))
    return client.request(method.upper(), url, json=body)


def test_every_route_but_health_needs_a_key(tenants: Tenants) -> None:
    checked = 0
    for method, path, operation in operations(tenants.a):
        if path.startswith("/ui"):
            continue  # static pages; their data comes from the routes checked here
        if (method, path) in PUBLIC:
            assert "security" not in operation, path
            assert call(tenants.anonymous, method, path, tenants.params).status_code == 200
            continue
        assert operation.get("security") == [{"HTTPBearer": []}], f"{method} {path}"
        assert "401" in operation["responses"], f"{method} {path}"
        response = call(tenants.anonymous, method, path, tenants.params)
        assert response.status_code == 401, f"{method} {path}: {response.text}"
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), path
        if not path.startswith("/v2"):
            assert response.json()["code"] == "unauthorized"
        checked += 1
    assert checked >= 20


def test_another_tenants_anything_is_not_found(tenants: Tenants) -> None:
    """Tenant B, with an admin key, names each of A's objects on every route that takes one:
    404 everywhere, as for an id that does not exist; A itself reads each of them, and finds
    them unchanged."""
    nothing = {name: NO_SUCH_ID for name in ("teacher_id", "ref", "job_id")}
    absent = {**tenants.params, **nothing, "name": "no-such-model"}
    checked = 0
    for method, path, _ in operations(tenants.a):
        if "{" not in path or path.startswith("/ui") or (method, path) in PUBLIC:
            continue
        response = call(tenants.b, method, path, tenants.params)
        assert response.status_code == 404, f"{method} {path}: {response.text}"
        assert call(tenants.b, method, path, absent).status_code == 404, f"{method} {path}"
        if method == "get" or path.endswith(("/predict", "/infer")):
            mine = call(tenants.a, method, path, tenants.params)
            assert mine.status_code == 200, f"{method} {path}: {mine.text}"
        checked += 1
    assert checked >= 14
    # B's deletes, cancels and alias changes changed nothing of A's.
    a, params = tenants.a, tenants.params
    assert a.get(f"/v1/teachers/{params['teacher_id']}").status_code == 200
    assert a.get(f"/v1/jobs/{params['job_id']}").json()["alias"] == "digits"
    assert tenants.b.post(f"/v1/jobs/{tenants.queued_job}/cancel").status_code == 404
    assert a.get(f"/v1/jobs/{tenants.queued_job}").json()["status"] == "queued"


def test_listings_show_only_the_callers_tenant(tenants: Tenants) -> None:
    mine = {
        "/v1/teachers": {tenants.params["teacher_id"]},
        "/v1/datasets": {tenants.params["ref"]},
        "/v1/jobs": {tenants.params["job_id"], tenants.queued_job},
    }
    for path, ids in mine.items():
        listed_a = {item.get("ref", item.get("id")) for item in tenants.a.get(path).json()["items"]}
        listed_b = {item.get("ref", item.get("id")) for item in tenants.b.get(path).json()["items"]}
        assert ids <= listed_a and not ids & listed_b, path
    assert tenants.b.get("/v1/jobs").json()["total"] == 0


def test_a_job_cannot_use_another_tenants_teacher_or_dataset(tenants: Tenants) -> None:
    params = tenants.params
    for body, field in (
        (job_body(params["teacher_id"]), "teacher"),
        (job_body(params["teacher_id"], dataset=params["ref"]), "teacher"),
    ):
        response = tenants.b.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["field"] == field
        assert response.json()["detail"] == f"No teacher with id {params['teacher_id']}."
    b_teacher = tenants.b.get("/v1/teachers").json()["items"]
    assert b_teacher == []


def test_each_tenant_has_its_own_aliases_and_teacher_cache(
    tenants: Tenants, digits_teacher: TeacherFiles
) -> None:
    b = tenants.b
    teacher = str(upload_teacher(b, digits_teacher)["id"])  # the same file as A's
    job = b.post("/v1/jobs", json=job_body(teacher)).json()["id"]
    run_job(job)
    assert b.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
    # The same alias in another tenant names that tenant's own student.
    assert b.put(f"/v1/jobs/{job}/alias", json={"alias": "digits"}).status_code == 200
    for client, job_id in ((tenants.a, tenants.params["job_id"]), (b, job)):
        infer = client.post("/v2/models/digits/infer", json=V2_BODY)
        assert infer.status_code == 200, infer.text
        assert client.get("/v2/models/digits").json()["name"] == "digits"
        assert client.get(f"/v1/jobs/{job_id}").json()["alias"] == "digits"
    # B's job computed its teacher outputs into B's cache, not from A's entry for the file.
    with db.session_scope() as session:
        owners = {session.get(Job, j).tenant_id for j in (tenants.params["job_id"], job)}  # type: ignore[union-attr]
    entries = {
        tenant: list(get_store().path(keys.teacher_cache(tenant)).glob("*.safetensors"))
        for tenant in owners
    }
    assert len(entries) == 2 and all(len(e) == 1 for e in entries.values()), entries
    # Emptying B's caches leaves A's; each tenant's usage counts its own.
    a_usage = tenants.a.get("/v1/usage").json()
    assert b.delete("/v1/cache").status_code == 204
    assert tenants.a.get("/v1/usage").json() == a_usage and a_usage["cache_bytes"] > 0
    assert b.get("/v1/usage").json()["cache_bytes"] == 0
    assert b.get("/v1/usage").json()["teachers_bytes"] == a_usage["teachers_bytes"]  # same file


def test_bad_expired_and_revoked_keys_are_refused(
    tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    def status_and_code(key: str) -> tuple[int, str]:
        response = tenants.anonymous.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert 'Bearer realm="distill"' in response.headers.get("WWW-Authenticate", "")
        return response.status_code, response.json()["code"]

    good = tenants.keys["a_member"]
    assert (
        tenants.anonymous.get("/v1/jobs", headers={"Authorization": f"Bearer {good}"}).status_code
        == 200
    )
    assert status_and_code("nonsense") == (401, "invalid_key")
    assert status_and_code(good[:-1] + ("A" if good[-1] != "A" else "B")) == (401, "invalid_key")
    with db.session_scope() as session:
        expired = create_key(
            session, "team-a", expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )[1]
    assert status_and_code(expired) == (401, "key_expired")
    with db.session_scope() as session:
        revoke_key(session, good)
    # A process trusts a key it checked for DISTILL_AUTH_CACHE_S (5 s), then reads it again.
    assert tenants.a_member.get("/v1/jobs").status_code == 200
    monkeypatch.setenv("DISTILL_AUTH_CACHE_S", "0")
    get_settings.cache_clear()
    assert status_and_code(good) == (401, "key_revoked")
    basic = tenants.anonymous.get("/v1/jobs", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401 and basic.json()["code"] == "unauthorized"


def test_metrics_need_an_admin_key(tenants: Tenants) -> None:
    assert tenants.a.get("/metrics").status_code == 200
    member = tenants.a_member.get("/metrics")
    assert member.status_code == 403 and member.json()["code"] == "forbidden"
    assert tenants.anonymous.get("/metrics").status_code == 401


def _answer_to_headers_only(url: str, headers: str) -> bytes:
    """Send a request's head announcing a 10 MB body, and none of the body: what the server
    answers within 10 s (b"" if it waits for the body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            f"POST /v1/teachers HTTP/1.1\r\nHost: {host}\r\n{headers}"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            "Content-Length: 10000000\r\n\r\n".encode()
        )
        try:
            return connection.recv(65536)
        except TimeoutError:
            return b""


def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(
    keyed_url: str,
) -> None:
    """An anonymous 10 MB upload is answered 401 from its head alone: the API does not wait
    for (or parse) a body it would refuse."""
    assert _answer_to_headers_only(keyed_url, "").startswith(b"HTTP/1.1 401")
    bad = "Authorization: Bearer dsk_00000000_nope\r\n"
    assert _answer_to_headers_only(keyed_url, bad).startswith(b"HTTP/1.1 401")
