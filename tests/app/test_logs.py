"""JSON logs: one object per line, carrying the request id of the HTTP request or the job id
of the job being handled."""

import json
import logging
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app import config
from app.logs import bind_process, configure_logging, log_context
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``DISTILL_LOG_FORMAT=json`` for this test, and the processes it starts."""
    monkeypatch.setenv("DISTILL_LOG_FORMAT", "json")
    config.get_settings.cache_clear()
    yield
    config.get_settings.cache_clear()  # before the variable goes: the next reads without it
    configure_logging()


def json_lines(text: str) -> list[dict[str, object]]:
    """The lines of ``text`` that are JSON objects (others: pytest's and libraries' prints)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def request_lines(text: str) -> dict[object, dict[str, object]]:
    return {
        line["request_id"]: line for line in json_lines(text) if line["message"] == "http.request"
    }


def test_each_request_is_one_json_line_with_its_request_id(
    stack: Stack, json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.main import create_app

    with TestClient(create_app(), headers=stack.headers) as client:
        given = client.get("/v1/jobs/no-such-job", headers={"X-Request-ID": "trace-42.a:b"})
        made = client.get("/healthz", headers={"X-Request-ID": "<script>" + "x" * 10})
        other = client.get("/healthz")
    assert given.headers["X-Request-ID"] == "trace-42.a:b"
    assert given.headers["content-type"] == "application/problem+json"
    # An id that does not look like one is replaced; every request gets its own.
    ids = [made.headers["X-Request-ID"], other.headers["X-Request-ID"]]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]

    lines = request_lines(capsys.readouterr().err)
    assert lines["trace-42.a:b"] | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "app.http",
        "message": "http.request",
        "request_id": "trace-42.a:b",
        "method": "GET",
        "path": "/v1/jobs/no-such-job",
        "route": "/v1/jobs/{job_id}",
        "status": 404,
        "duration_ms": lines["trace-42.a:b"]["duration_ms"],
    }
    assert str(lines["trace-42.a:b"]["time"]).endswith("+00:00")
    # Health checks are polled: their lines are DEBUG, below the default level.
    assert not set(ids) & set(lines)


def test_an_unexpected_error_is_logged_and_answered_with_the_request_id(
    stack: Stack, json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.main import create_app

    app = create_app()

    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/broken", headers={"X-Request-ID": "bug-7"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["X-Request-ID"] == "bug-7"
    lines = [line for line in json_lines(capsys.readouterr().err) if line.get("request_id")]
    error = next(line for line in lines if line["message"] == "request.unhandled_error")
    assert error["request_id"] == "bug-7" and "RuntimeError: a bug" in str(error["exc_info"])
    access = next(line for line in lines if line["message"] == "http.request")
    assert access["status"] == 500 and access["route"] == "/broken"


def test_context_reaches_every_logger_and_thread(
    stack: Stack, json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging()
    library = logging.getLogger("some.library")
    with log_context(job_id="job-1"):
        library.warning("inside")
        library.info("explicit", extra={"job_id": "job-2"})  # a call's own extra wins
    library.warning("outside")
    bind_process(attempt=3)
    try:
        thread = threading.Thread(target=lambda: library.warning("thread"))
        thread.start()
        thread.join()
    finally:
        bind_process(attempt=None)
    library.warning("unbound")
    lines = {line["message"]: line for line in json_lines(capsys.readouterr().err)}
    assert lines["inside"]["job_id"] == "job-1" and lines["inside"]["logger"] == "some.library"
    assert lines["explicit"]["job_id"] == "job-2"
    assert "job_id" not in lines["outside"]
    assert lines["thread"]["attempt"] == 3
    assert "attempt" not in lines["unbound"]


def test_a_job_process_logs_its_job_id_on_every_line(
    client: TestClient,
    digits_teacher: TeacherFiles,
    json_logs: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The worker's task runs the job in a process of its own, whose lines (to stderr, JSON
    from the setting it inherits) all carry the job and attempt."""
    from worker.tasks import distill

    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 1, "batch_size": 64, "seed": 0})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    capfd.readouterr()
    distill.run()  # the worker's turn: it claims the one queued job
    lines = json_lines(capfd.readouterr().err)

    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    phases = [line["phase"] for line in lines if line["message"] == "job.phase"]
    assert phases[0] == "validating" and "exporting" in phases
    assert all(line["job_id"] == job_id and line["attempt"] == 1 for line in lines), lines
