"""``GET /v1/jobs/{id}/events``: server-sent events (WHATWG HTML Standard, "Server-sent events").

Unit: snapshots of a job's rows into events, their ids, resumption from a ``Last-Event-ID``
(``app.jobs.events``). Through HTTP, on both stacks: a job run in process in a thread, read with a
real SSE client (``httpx-sse``) from uvicorn in a thread, live, resumed and replayed.
"""

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_sse import ServerSentEvent, connect_sse
from sqlalchemy import update

from app.auth import create_key, revoke_key
from app.db import session_scope
from app.jobs.events import (
    POLL_INTERVAL_S,
    RETRY_MS,
    Cursor,
    EventType,
    Final,
    JobEvent,
    JobSnapshot,
    MetricRow,
    advance,
)
from app.models import Job, JobPhase, JobStatus, KeyRole
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.servers import serving
from tests.helpers.stacks import key_headers
from tests.helpers.teachers import TeacherFiles
from worker.attempt import Attempt
from worker.pipeline import run_job

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snapshot(
    status: str = "running",
    phase: str = "training",
    *,
    attempt: int = 1,
    progress: float = 0.0,
    preflight: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    metrics: tuple[int, ...] = (),
    first_row: int = 10,
) -> JobSnapshot:
    """A job's snapshot; ``metrics`` are epochs, their rows numbered from ``first_row``."""
    rows = [
        MetricRow(first_row + i, epoch, {"loss": 1.0 / epoch}, T0)
        for i, epoch in enumerate(metrics)
    ]
    return JobSnapshot(status, phase, attempt, progress, preflight, result, error, rows)


def kinds(events: list[JobEvent]) -> list[str]:
    return [e.event.value for e in events]


# -- unit: snapshots into events --------------------------------------------------------------


def test_a_fresh_client_gets_the_status_then_each_change_once() -> None:
    events, cursor = advance(Cursor(), snapshot("queued", "queued", attempt=0), now=0.0)
    assert [(e.id, e.event, e.data) for e in events] == [
        (
            "1.0.queued.queued.0.0.0.0",
            EventType.STATUS,
            {"status": "queued", "phase": "queued", "attempt": 0},
        )
    ]
    assert advance(cursor, snapshot("queued", "queued", attempt=0), now=0.5)[0] == []
    events, cursor = advance(cursor, snapshot("running", "validating"), now=1.0)
    assert kinds(events) == ["status"] and events[0].data["phase"] == "validating"
    report: dict[str, Any] = {"warnings": []}
    events, cursor = advance(
        cursor, snapshot("running", "teacher_outputs", preflight=report), now=1.5
    )
    assert kinds(events) == ["preflight", "status"] and events[0].data == report
    events, cursor = advance(cursor, snapshot("running", "training", preflight=report), now=2.0)
    assert kinds(events) == ["status"]  # the preflight went once
    # A retry is a new attempt: a status event though status and phase are the same.
    events, _ = advance(cursor, snapshot("running", "training", attempt=2, preflight=report), 2.5)
    assert [e.data for e in events] == [{"status": "running", "phase": "training", "attempt": 2}]


def test_metrics_go_once_per_row_in_the_metrics_endpoints_shape() -> None:
    cursor = advance(Cursor(), snapshot(), now=0.0)[1]
    events, cursor = advance(cursor, snapshot(metrics=(1, 2)), now=0.5)
    assert [e.data for e in events] == [
        {"epoch": 1, "values": {"loss": 1.0}, "created_at": "2026-01-01T00:00:00Z"},
        {"epoch": 2, "values": {"loss": 0.5}, "created_at": "2026-01-01T00:00:00Z"},
    ]
    assert cursor.metric == 11
    # Rows the client has seen are skipped; a poll reads only newer ones but may overlap.
    events, cursor = advance(cursor, snapshot(metrics=(1, 2, 3)), now=1.0)
    assert [e.data["epoch"] for e in events] == [3]
    # Retried from the checkpoint of epoch 1: epochs 2 and 3 are rewritten as new rows.
    events, cursor = advance(cursor, snapshot(metrics=(2, 3), first_row=20), now=1.5)
    assert [e.data["epoch"] for e in events] == [2, 3] and cursor.metric == 21


def test_progress_is_paced_by_one_percent_or_two_seconds() -> None:
    cursor = advance(Cursor(), snapshot(), now=0.0)[1]
    events, cursor = advance(cursor, snapshot(progress=0.05), now=1.0)
    assert [e.data for e in events] == [{"progress": 0.05}]
    assert advance(cursor, snapshot(progress=0.055), now=2.0)[0] == []  # under 1 %, under 2 s
    events, cursor = advance(cursor, snapshot(progress=0.055), now=3.0)  # 2 s on: any change
    assert [e.data for e in events] == [{"progress": 0.055}]
    events, cursor = advance(cursor, snapshot(progress=0.065), now=3.5)  # 1 %
    assert [e.data for e in events] == [{"progress": 0.065}]
    assert advance(cursor, snapshot(progress=0.065), now=10.0)[0] == []  # no change, no event


def test_a_succeeded_job_replays_status_preflight_metrics_progress_result_end() -> None:
    report: dict[str, Any] = {"warnings": []}
    result = {"student_accuracy": 0.9}
    done = snapshot(
        "succeeded", "done", progress=1.0, preflight=report, result=result, metrics=(1, 2, 3)
    )
    events, cursor = advance(Cursor(), done, now=0.0)
    assert kinds(events) == [
        "status",
        "preflight",
        "metrics",
        "metrics",
        "metrics",
        "progress",
        "result",
        "end",
    ]
    assert events[-2].data == result and events[-1].data == {"status": "succeeded"}
    assert [e.id.split(".")[0] for e in events] == [str(i) for i in range(1, 9)]
    assert events[-1].id == "8.1.succeeded.done.1.12.10000.2"
    assert cursor.final is Final.END
    assert advance(cursor, done, now=1.0)[0] == []  # nothing follows `end`


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_failed_or_cancelled_job_ends_with_its_error(status: JobStatus) -> None:
    error = {"code": "teacher_missing", "detail": "gone"}
    events, _ = advance(Cursor(), snapshot(status, "done", progress=0.3, error=error), now=0.0)
    assert kinds(events) == ["status", "progress", "error", "end"]
    assert events[2].data == error and events[3].data == {"status": status}


def test_an_ended_job_without_result_or_error_still_ends() -> None:
    events, _ = advance(Cursor(), snapshot("cancelled", "done"), now=0.0)
    assert kinds(events) == ["status", "end"]


def test_ids_round_trip_and_unreadable_ones_replay_everything() -> None:
    cursor = Cursor(3, 2, "running", "training", True, 41, 6500, Final.NONE)
    assert Cursor.decode(cursor.encode()) == cursor
    assert Cursor.decode(" " + cursor.encode() + " ") == cursor
    for bad in (None, "", "garbage", "1.2.3", "1.1.running.training.2.0.0.0", "x" * 10_000):
        assert Cursor.decode(bad) == Cursor()


def test_resuming_from_any_id_sends_exactly_the_rest() -> None:
    """From the id of any event of a replay, the same snapshot gives the events after it, ids
    and all: the id holds everything the client has seen."""
    done = snapshot(
        "succeeded",
        "done",
        progress=1.0,
        preflight={"warnings": []},
        result={"student_accuracy": 0.9},
        metrics=(1, 2, 3, 4, 5),
    )
    replay, _ = advance(Cursor(), done, now=0.0)
    for i, event in enumerate(replay):
        assert advance(Cursor.decode(event.id), done, now=100.0)[0] == replay[i + 1 :]


def test_resuming_sends_the_current_status_once_not_the_missed_ones() -> None:
    running = snapshot("running", "training", progress=0.4, metrics=(1, 2))
    seen, _ = advance(Cursor(), running, now=0.0)
    later = snapshot("running", "exporting", progress=0.95, metrics=(1, 2, 3, 4, 5))
    events, _ = advance(Cursor.decode(seen[-1].id), later, now=0.0)
    assert kinds(events) == ["metrics", "metrics", "metrics", "status", "progress"]
    assert [e.data["epoch"] for e in events[:3]] == [3, 4, 5]
    assert events[3].data["phase"] == "exporting"
    assert int(events[0].id.split(".")[0]) == int(seen[-1].id.split(".")[0]) + 1


def test_the_wire_format_is_one_json_data_line() -> None:
    event = JobEvent("1.0.queued.queued.0.0.0.0", EventType.ERROR, {"detail": "a\nb"})
    wire = event.sse(RETRY_MS).encode().decode()
    assert wire.replace("\r\n", "\n") == (
        'id: 1.0.queued.queued.0.0.0.0\nevent: error\ndata: {"detail":"a\\nb"}\nretry: 2000\n\n'
    )


# -- through HTTP --------------------------------------------------------------------------------


@pytest.fixture
def server_url(client: TestClient) -> Iterator[str]:
    """The app served by uvicorn in a thread (the `client` fixture migrates and cleans up)."""
    from app.main import create_app

    with serving(create_app()) as address:
        yield f"http://{address}"


def read_stream(
    server_url: str, job_id: str, last_event_id: str | None = None
) -> tuple[list[ServerSentEvent], httpx.Response]:
    """Every event until the server closes the stream (a timeout fails the test)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    with (
        httpx.Client(base_url=server_url, headers=key_headers(), timeout=60) as http,
        connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        source.response.raise_for_status()
        return list(source.iter_sse()), source.response


def data(events: list[ServerSentEvent], kind: str) -> list[Any]:
    return [e.json() for e in events if e.event == kind]


def test_an_unknown_job_is_a_404_problem(client: TestClient) -> None:
    response = client.get("/v1/jobs/nope/events")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_a_running_job_is_followed_resumed_and_replayed(
    client: TestClient,
    server_url: str,
    digits_teacher: TeacherFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Epochs of the tiny job take milliseconds: slower, so that the stream sees them one by one.
    epoch_end = Attempt.epoch_end

    def slow_epoch_end(self: Attempt, epoch: int, values: dict[str, float]) -> None:
        epoch_end(self, epoch, values)
        time.sleep(3 * POLL_INTERVAL_S)

    monkeypatch.setattr(Attempt, "epoch_end", slow_epoch_end)
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(
        teacher["id"], training={"epochs": 5, "batch_size": 64, "learning_rate": 0.01, "seed": 0}
    )
    job_id = client.post("/v1/jobs", json=body).json()["id"]

    received: list[ServerSentEvent] = []
    arrived: list[float] = []
    opened = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(base_url=server_url, headers=key_headers(), timeout=120) as http,
            connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source,
        ):
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for event in source.iter_sse():
                received.append(event)
                arrived.append(time.monotonic())
                opened.set()

    reader = threading.Thread(target=follow)
    reader.start()
    assert opened.wait(30), "no first event"
    worker = threading.Thread(target=run_job, args=(job_id,))
    worker.start()
    worker.join(timeout=300)
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream did not close when the job ended"

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]

    assert received[0].retry == RETRY_MS and received[0].event == "status"
    statuses = data(received, "status")
    assert statuses[0] == {"status": "queued", "phase": "queued", "attempt": 0}
    assert statuses[-1] == {"status": "succeeded", "phase": "done", "attempt": 1}
    order = list(JobPhase)
    phases = [order.index(JobPhase(s["phase"])) for s in statuses]
    # Phases only move forward, and each change is sent once. A poll may catch the job between
    # its last phase (`done`, still running: its last cancel check) and its end: `done` then
    # comes twice, with two statuses (CI of 38799e9 saw it).
    assert phases == sorted(phases), statuses
    changes = [(s["status"], s["phase"]) for s in statuses]
    assert len(set(changes)) == len(changes), statuses
    assert "training" in [s["phase"] for s in statuses]
    assert data(received, "metrics") == metrics
    # Live: each epoch arrived on its own, as the worker wrote it.
    at = [t for t, e in zip(arrived, received, strict=True) if e.event == "metrics"]
    assert all(b - a > POLL_INTERVAL_S for a, b in itertools.pairwise(at)), at
    assert data(received, "result") == [job["result"]]
    assert len(data(received, "preflight")) == 1
    progress = [p["progress"] for p in data(received, "progress")]
    assert progress and progress[-1] == 1.0
    assert [e.event for e in received[-2:]] == ["result", "end"]
    assert received[-1].json() == {"status": "succeeded"}
    ids = [int(e.id.split(".")[0]) for e in received]
    assert ids == list(range(1, len(received) + 1))

    # Reconnecting after the 2nd metrics event: epochs 3..5, the status now, the result, end.
    second = [e for e in received if e.event == "metrics"][1]
    resumed, _ = read_stream(server_url, job_id, second.id)
    assert data(resumed, "metrics") == metrics[2:]
    assert [e.event for e in resumed] == [
        *["metrics"] * 3,
        "status",
        *(["progress"] if data(resumed, "progress") else []),
        "result",
        "end",
    ]
    assert data(resumed, "status") == [statuses[-1]]
    assert data(resumed, "result") == [job["result"]]
    assert int(resumed[0].id.split(".")[0]) == int(second.id.split(".")[0]) + 1

    # A finished job's stream replays everything at once and ends.
    started = time.monotonic()
    replay, _ = read_stream(server_url, job_id)
    assert time.monotonic() - started < 5
    assert data(replay, "metrics") == metrics
    assert data(replay, "status") == [statuses[-1]]
    assert [e.event for e in replay[-2:]] == ["result", "end"]
    assert data(replay, "preflight") == data(received, "preflight")
    # After `end`, 204: an EventSource stops reconnecting.
    with httpx.Client(base_url=server_url, headers=key_headers(), timeout=30) as http:
        after_end = http.get(
            f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": received[-1].id}
        )
    assert after_end.status_code == 204


def test_a_job_that_fails_while_followed_ends_with_its_error(
    client: TestClient, server_url: str, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    error = {"code": "internal_error", "detail": "The worker fell over."}
    received: list[ServerSentEvent] = []

    def follow() -> None:
        with (
            httpx.Client(base_url=server_url, headers=key_headers(), timeout=60) as http,
            connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source,
        ):
            received.extend(source.iter_sse())

    reader = threading.Thread(target=follow)
    reader.start()
    deadline = time.monotonic() + 30
    while not received:
        assert time.monotonic() < deadline, "no first event"
        time.sleep(0.05)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.FAILED, phase=JobPhase.DONE, error=error)
        )
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not close when the job ended"
    # The preflight ran at submission: it is on the job from the start.
    assert [e.event for e in received] == ["status", "preflight", "status", "error", "end"]
    assert received[2].json() == {"status": "failed", "phase": "done", "attempt": 0}
    assert received[3].json() == error and received[4].json() == {"status": "failed"}


def test_a_client_that_leaves_a_queued_job_stops_its_stream(
    client: TestClient, server_url: str, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    with (
        httpx.Client(base_url=server_url, headers=key_headers(), timeout=30) as http,
        connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source,
    ):
        first = next(source.iter_sse())
    assert first.event == "status" and first.json()["status"] == "queued"
    assert Cursor.decode(first.id).final is Final.NONE
    # The server keeps answering (the stream it served is gone; uvicorn stops in the fixture).
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200


def test_a_stream_ends_once_its_key_is_revoked(
    keyed_url: str, digits_teacher: TeacherFiles
) -> None:
    """A stream opened with a key closes within a poll of the key's revocation (the server
    trusts a key DISTILL_AUTH_CACHE_S, 0 here), and opening it again is a 401."""
    with session_scope() as session:
        row, key = create_key(session, "followers", KeyRole.MEMBER)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=keyed_url, headers=headers, timeout=30) as http:
        with open(digits_teacher.onnx, "rb") as f:
            teacher = http.post("/v1/teachers", files={"file": ("t.onnx", f)}).json()["id"]
        job_id = http.post("/v1/jobs", json=job_body(teacher)).json()["id"]
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            events = source.iter_sse()
            assert next(events).json()["status"] == "queued"  # it stays queued: no worker
            with session_scope() as session:
                revoke_key(session, row.prefix)
            revoked = time.monotonic()
            rest = [event.event for event in events]  # the rest of the first snapshot, then
            assert rest == ["preflight"]  # the stream ends, without an `end`: the job goes on
        assert time.monotonic() - revoked < 5 * POLL_INTERVAL_S
        again = http.get(f"/v1/jobs/{job_id}/events")
        assert (again.status_code, again.json()["code"]) == (401, "key_revoked")
