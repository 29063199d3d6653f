"""A job followed as it runs: server-sent events (the WHATWG HTML Standard, "Server-sent events",
https://html.spec.whatwg.org/multipage/server-sent-events.html) made from snapshots of the job's
rows, which the worker writes and the API process polls.

The stream is a *diff of snapshots*: ``advance(cursor, snapshot)`` returns the events that take a
client from what it has seen (``cursor``) to the job's state now (``snapshot``), and the cursor
after each event. Each event's ``id`` field is that cursor, written out (``Cursor.encode``): the
EventSource client keeps the last one it received and sends it back in the ``Last-Event-ID``
header when it reconnects (the spec's "last event ID string"), and ``Cursor.decode`` turns it back
into exactly what that client has seen, with no state kept on the server.

Event types (the spec's ``event`` field; ``data`` is one line of JSON):

- ``status``: ``{"status", "phase", "attempt"}``, whenever one of them changed (a retried job's
  new attempt is a change even where status and phase are the same).
- ``preflight``: the job's preflight report, once, when it appears.
- ``metrics``: ``{"epoch", "values", "created_at"}``, one per per-epoch metrics row, as
  ``GET /v1/jobs/{id}/metrics`` lists it. A row is known by its database id, not its epoch: a job
  retried from a checkpoint rewrites the epochs after it, and such a rewritten epoch is sent
  again (it replaces the one the client had).
- ``progress``: ``{"progress"}``, the fraction done, when it moved by at least 1 % or changed at
  all ``PROGRESS_INTERVAL_S`` after the last one.
- ``result`` (a succeeded job's result) or ``error`` (a failed or cancelled job's error), once the
  job has ended.
- ``end``: ``{"status"}``, the last event: the job has ended, the stream closes.

A stream opens with the job's status. Then, within each snapshot, the order is preflight, metrics,
status, progress, then result or error and end: what happened (the preflight, the epochs), where
the job is now, how it ended.

Ids: ``<seq>.<attempt>.<status>.<phase>.<preflight>.<metric>.<progress>.<final>``, e.g.
``12.1.running.training.1.42.6500.0``: ``seq`` numbers the events a client received, continuing
across its reconnects, so ids order every event it saw; then the status key last sent, whether
the preflight was sent (0/1), the database id of the last metrics row sent, the progress last sent
in basis points, and 0, 1 once the result or error was sent, 2 once ``end`` was. Status changes
are not stored historically: a client that reconnects gets the current status once if it differs
from the one in its id, never the ones it missed in between. An id this module cannot read (a
hand-written one, one from an older format) counts as none: the whole stream again.
"""

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session
from sse_starlette import ServerSentEvent
from starlette.requests import Request

from app.db import session_scope
from app.dependencies import database_slot
from app.errors import NotFound
from app.jobs.schemas import MetricOut
from app.models import TERMINAL_STATUSES, Job, JobMetric

# The spec's ``retry`` field: how long an EventSource waits before reconnecting (milliseconds).
RETRY_MS = 2000
# How often the API process reads the job's rows while it follows a running job.
POLL_INTERVAL_S = 0.5
# The spec recommends a comment line about every 15 s so that proxies keep the connection open.
KEEP_ALIVE_S = 15.0
# A progress event when the fraction moved by this much, or changed at all after this long.
PROGRESS_STEP = 100  # basis points: 1 %
PROGRESS_INTERVAL_S = 2.0

_FIELD = r"[A-Za-z0-9_-]*"
_ID = re.compile(
    rf"(?P<seq>\d{{1,18}})\.(?P<attempt>-?\d{{1,9}})\.(?P<status>{_FIELD})\.(?P<phase>{_FIELD})"
    r"\.(?P<preflight>[01])\.(?P<metric>\d{1,18})\.(?P<progress>\d{1,5})\.(?P<final>[012])"
)


class EventType(StrEnum):
    STATUS = "status"
    PREFLIGHT = "preflight"
    PROGRESS = "progress"
    METRICS = "metrics"
    RESULT = "result"
    ERROR = "error"
    END = "end"


class Final(IntEnum):
    """How far through a job's ending a client is."""

    NONE = 0
    OUTCOME = 1  # the result or error was sent
    END = 2  # ``end`` was sent: nothing follows


@dataclass(frozen=True)
class MetricRow:
    """One per-epoch metrics row (``JobMetric``); ``id`` is its database id."""

    id: int
    epoch: int
    values: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class JobSnapshot:
    """What a poll reads of a job: its row, and its metrics rows newer than the client's."""

    status: str
    phase: str
    attempt: int
    progress: float
    preflight: Mapping[str, Any] | None
    result: Mapping[str, Any] | None
    error: Mapping[str, Any] | None
    metrics: Sequence[MetricRow]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Cursor:
    """What a client has seen; written out as the id of the event that took it there.

    ``progress_sent_at`` (a monotonic time) only paces progress events on one connection: it is
    not part of the id, and a reconnected client's first change of progress is sent at once.
    """

    seq: int = 0
    attempt: int = -1
    status: str = ""
    phase: str = ""
    preflight: bool = False
    metric: int = 0
    progress: int = 0
    final: Final = Final.NONE
    progress_sent_at: float | None = None

    def encode(self) -> str:
        """The event id (the spec forbids only LF, CR and NUL in it; this holds none)."""
        return (
            f"{self.seq}.{self.attempt}.{self.status}.{self.phase}.{int(self.preflight)}."
            f"{self.metric}.{self.progress}.{int(self.final)}"
        )

    @classmethod
    def decode(cls, last_event_id: str | None) -> "Cursor":
        """The cursor a ``Last-Event-ID`` header names; a fresh one when there is none or it
        cannot be read (the client then gets the whole stream)."""
        match = None if last_event_id is None else _ID.fullmatch(last_event_id.strip())
        if match is None:
            return cls()
        return cls(
            seq=int(match["seq"]),
            attempt=int(match["attempt"]),
            status=match["status"],
            phase=match["phase"],
            preflight=match["preflight"] == "1",
            metric=int(match["metric"]),
            progress=min(int(match["progress"]), 10_000),
            final=Final(int(match["final"])),
        )


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event: ``id``, ``event`` and the JSON ``data``."""

    id: str
    event: EventType
    data: Any

    def data_json(self) -> str:
        """The ``data`` field: compact JSON, on one line (JSON escapes every line break)."""
        return json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))

    def sse(self, retry_ms: int | None = None) -> ServerSentEvent:
        """The event for the wire (``retry``: the spec's reconnection time, milliseconds)."""
        return ServerSentEvent(
            data=self.data_json(), event=self.event.value, id=self.id, retry=retry_ms
        )


def basis_points(fraction: float) -> int:
    return max(0, min(10_000, round(fraction * 10_000)))


def _progress_due(cursor: Cursor, progress: int, now: float) -> bool:
    if progress == cursor.progress:
        return False
    if abs(progress - cursor.progress) >= PROGRESS_STEP or progress == 10_000:
        return True
    return cursor.progress_sent_at is None or now - cursor.progress_sent_at >= PROGRESS_INTERVAL_S


def advance(cursor: Cursor, snapshot: JobSnapshot, now: float) -> tuple[list[JobEvent], Cursor]:
    """The events that take a client from ``cursor`` to ``snapshot``, and the cursor after them.

    ``snapshot.metrics`` may hold rows the client has seen (id up to ``cursor.metric``): they are
    skipped. ``now`` is a monotonic time, for pacing progress events.
    """
    events: list[JobEvent] = []

    def emit(event: EventType, data: Any, **changes: Any) -> None:
        nonlocal cursor
        cursor = replace(cursor, seq=cursor.seq + 1, **changes)
        events.append(JobEvent(cursor.encode(), event, data))

    def emit_status() -> None:
        key = (snapshot.attempt, snapshot.status, snapshot.phase)
        if key != (cursor.attempt, cursor.status, cursor.phase):
            data = {"status": snapshot.status, "phase": snapshot.phase, "attempt": key[0]}
            emit(EventType.STATUS, data, attempt=key[0], status=key[1], phase=key[2])

    if cursor.final is Final.END:
        return events, cursor
    if cursor.status == "":  # a stream's first event: where the job is
        emit_status()
    if snapshot.preflight is not None and not cursor.preflight:
        emit(EventType.PREFLIGHT, dict(snapshot.preflight), preflight=True)
    for row in sorted(snapshot.metrics, key=lambda r: r.id):
        if row.id > cursor.metric:
            item = MetricOut(epoch=row.epoch, values=dict(row.values), created_at=row.created_at)
            emit(EventType.METRICS, item.model_dump(mode="json"), metric=row.id)
    emit_status()
    progress = basis_points(snapshot.progress)
    if _progress_due(cursor, progress, now):
        emit(
            EventType.PROGRESS,
            {"progress": progress / 10_000},
            progress=progress,
            progress_sent_at=now,
        )
    if snapshot.terminal:
        if cursor.final is Final.NONE:
            if snapshot.result is not None:
                emit(EventType.RESULT, dict(snapshot.result), final=Final.OUTCOME)
            elif snapshot.error is not None:
                emit(EventType.ERROR, dict(snapshot.error), final=Final.OUTCOME)
        emit(EventType.END, {"status": snapshot.status}, final=Final.END)
    return events, cursor


def read_snapshot(
    session: Session, tenant_id: str, job_id: str, after_metric: int
) -> JobSnapshot | None:
    """The job's row, then its metrics rows with an id above ``after_metric``; None when the
    tenant has no such job. The row is read first: once it shows the job ended, every metrics
    row the worker wrote was committed before, so the rows read next are all of them."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        return None
    rows = session.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.id > after_metric)
        .order_by(JobMetric.id)
    )
    return JobSnapshot(
        status=job.status,
        phase=job.phase,
        attempt=job.attempt,
        progress=job.progress,
        preflight=job.preflight,
        result=job.result,
        error=job.error,
        metrics=[MetricRow(r.id, r.epoch, r.values, r.created_at) for r in rows],
    )


def _load(tenant_id: str, job_id: str, after_metric: int) -> JobSnapshot | None:
    with session_scope() as session:
        return read_snapshot(session, tenant_id, job_id, after_metric)


async def load_snapshot(tenant_id: str, job_id: str, after_metric: int = 0) -> JobSnapshot | None:
    """``read_snapshot`` in a short session of its own, on a worker thread, once this request
    holds one of the API's database slots (``app.dependencies.db_slot``): nothing is held across
    the wait between polls."""
    async with database_slot():
        return await anyio.to_thread.run_sync(_load, tenant_id, job_id, after_metric)


async def first_snapshot(tenant_id: str, job_id: str, cursor: Cursor) -> JobSnapshot:
    """The snapshot a stream starts from.

    Raises:
        NotFound: the tenant has no job with this id (404 problem+json, as
            ``GET /v1/jobs/{id}``).
    """
    snapshot = await load_snapshot(tenant_id, job_id, cursor.metric)
    if snapshot is None:
        raise NotFound(f"No job with id {job_id}.")
    return snapshot


async def follow(
    request: Request,
    tenant_id: str,
    job_id: str,
    cursor: Cursor,
    snapshot: JobSnapshot,
    allowed: Callable[[], Awaitable[bool]],
) -> AsyncIterator[ServerSentEvent]:
    """The events from ``cursor`` on: those ``snapshot`` holds, then those of a fresh snapshot
    every ``POLL_INTERVAL_S``, until ``end`` is sent, the client disconnects, the job is
    deleted, or ``allowed`` (asked before each poll: is the caller's key still valid?) says no.
    The first event carries the spec's ``retry`` field (``RETRY_MS``)."""
    retry: int | None = RETRY_MS
    while True:
        events, cursor = advance(cursor, snapshot, time.monotonic())
        for event in events:
            yield event.sse(retry)
            retry = None
        if cursor.final is Final.END:
            return
        await anyio.sleep(POLL_INTERVAL_S)
        if await request.is_disconnected() or not await allowed():
            return
        next_snapshot = await load_snapshot(tenant_id, job_id, cursor.metric)
        if next_snapshot is None:
            return
        snapshot = next_snapshot
