from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.config import MIB
from app.dependencies import SessionDep
from app.errors import problem_responses
from app.jobs import service
from app.jobs.schemas import DistillationSpec, JobOut, JobPage, MetricList, MetricOut
from app.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# Past any page there is: a bound keeps the number one the database takes.
MAX_OFFSET = 2**31 - 1


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    max_body_size=MIB,
    responses=problem_responses(503),
)
def create_job(session: SessionDep, spec: DistillationSpec, response: Response) -> JobOut:
    """Submit a distillation job; it is queued and runs on a worker."""
    job = service.create_job(session, spec)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return service.job_out(session, job)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status: JobStatus | None = None,
) -> JobPage:
    """Jobs, newest first, optionally of one status."""
    jobs, total = service.list_jobs(session, limit=limit, offset=offset, status=status)
    return JobPage(items=service.jobs_out(session, jobs), total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(session: SessionDep, job_id: str) -> JobOut:
    """Status, phase, progress, latest metrics, and the result or error."""
    return service.job_out(session, service.get_job(session, job_id))


@router.get("/{job_id}/metrics", response_model=MetricList)
def get_metrics(session: SessionDep, job_id: str) -> MetricList:
    """One row per epoch: losses, student and teacher accuracy, agreement."""
    rows = service.list_metrics(session, job_id)
    return MetricList(
        items=[MetricOut(epoch=r.epoch, values=r.values, created_at=r.created_at) for r in rows]
    )


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problem_responses(409),
)
def cancel_job(session: SessionDep, job_id: str) -> JobOut:
    """Cancel a job: at once if queued, at the worker's next check if running."""
    return service.job_out(session, service.cancel_job(session, job_id))
