from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from sse_starlette import EventSourceResponse

from app.auth import PrincipalDep, bearer_token, principal_for
from app.config import MIB
from app.dependencies import SessionDep, StoreDep
from app.errors import Unauthorized, problem_responses
from app.idempotency import IdempotencyDep
from app.jobs import events, service
from app.jobs.schemas import DistillationSpec, JobOut, JobPage, MetricList, MetricOut
from app.models import JobStatus
from app.serving import service as serving

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# Past any page there is: a bound keeps the number one the database takes.
MAX_OFFSET = 2**31 - 1


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    max_body_size=MIB,
    responses=problem_responses(409, 429, 503, 507),
)
def create_job(
    principal: PrincipalDep,
    idempotency: IdempotencyDep,
    session: SessionDep,
    spec: DistillationSpec,
    response: Response,
) -> JobOut | Response:
    """Submit a distillation job; it is queued and runs on a worker."""
    if idempotency.replay is not None:
        return idempotency.replay
    job = service.create_job(session, principal.tenant_id, spec)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return idempotency.remember(service.job_out(session, job))


@router.get("", response_model=JobPage)
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status: JobStatus | None = None,
) -> JobPage:
    """The tenant's jobs, newest first, optionally of one status."""
    jobs, total = service.list_jobs(
        session, principal.tenant_id, limit=limit, offset=offset, status=status
    )
    return JobPage(items=service.jobs_out(session, jobs), total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(principal: PrincipalDep, session: SessionDep, job_id: str) -> JobOut:
    """Status, phase, progress, latest metrics, and the result or error."""
    return service.job_out(session, service.get_job(session, principal.tenant_id, job_id))


@router.get("/{job_id}/metrics", response_model=MetricList)
def get_metrics(principal: PrincipalDep, session: SessionDep, job_id: str) -> MetricList:
    """One row per epoch: losses, student and teacher accuracy, agreement."""
    rows = service.list_metrics(session, principal.tenant_id, job_id)
    return MetricList(
        items=[MetricOut(epoch=r.epoch, values=r.values, created_at=r.created_at) for r in rows]
    )


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "The job's server-sent events, until it ends.",
            # Under OpenAPI 3.1 a stream's schema describes each event.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "event": {"type": "string"},
                            "data": {"type": "string"},
                            "retry": {"type": "integer"},
                        },
                    }
                }
            },
        },
        204: {"description": "The `Last-Event-ID` is the `end` event's: nothing follows."},
    },
)
async def job_events(
    principal: PrincipalDep,
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Follow a job as it runs: server-sent events (WHATWG HTML Standard, "Server-sent events";
    `text/event-stream`), ending when the job ends.

    Events (``event:``; ``data:`` one line of JSON): ``status`` (``status``, ``phase``,
    ``attempt``; on every change), ``preflight`` (the report, once), ``metrics`` (``epoch``,
    ``values``, ``created_at``; one per epoch, as ``/metrics`` lists them), ``progress``
    (``progress``, a fraction; on a change of 1 % or after 2 s), then ``result`` or ``error``, and
    ``end`` (``status``) last, after which the stream closes; it closes early once the key it
    was opened with is revoked or expires. The first event carries ``retry:``;
    a comment every 15 s keeps the connection open. The rows are polled every 0.5 s.

    Each ``id:`` is what the client has seen so far (``app.jobs.events``: ``<seq>.<attempt>.
    <status>.<phase>.<preflight>.<metrics row>.<progress>.<final>``). Reconnecting with it in
    ``Last-Event-ID`` (an EventSource does so itself) sends only what the client has not seen:
    later metrics rows, the preflight if not sent, the current status once if it differs, the
    progress if changed, the outcome and ``end``. Statuses are not stored historically, so the
    ones passed through while disconnected are not replayed. After ``end``'s id the answer is 204,
    which stops an EventSource from reconnecting. An unreadable id replays the whole stream.
    """
    cursor = events.Cursor.decode(last_event_id)
    snapshot = await events.first_snapshot(principal.tenant_id, job_id, cursor)
    if cursor.final is events.Final.END:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    token = bearer_token(request.headers.get("authorization"))

    async def key_still_valid() -> bool:
        # Cached for DISTILL_AUTH_CACHE_S, as for any request: a revoked key ends the stream
        # that late, and its reconnection is a 401.
        try:
            await principal_for(token)
        except Unauthorized:
            return False
        return True

    return EventSourceResponse(
        events.follow(request, principal.tenant_id, job_id, cursor, snapshot, key_still_valid),
        ping=events.KEEP_ALIVE_S,
    )


@router.delete(
    "/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(409)
)
def delete_job(
    principal: PrincipalDep, session: SessionDep, store: StoreDep, job_id: str
) -> Response:
    """Delete a finished job: its metrics, its student's files, its alias. A queued or running
    job is a 409: cancel it first."""
    job = service.delete_job(session, principal.tenant_id, store, job_id)
    serving.forget(principal.tenant_id, job.alias, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problem_responses(409),
)
def cancel_job(principal: PrincipalDep, session: SessionDep, job_id: str) -> JobOut:
    """Cancel a job: at once if queued, at the worker's next check if running."""
    return service.job_out(session, service.cancel_job(session, principal.tenant_id, job_id))
