"""What a tenant stores: its usage in bytes, and its cached teacher outputs to empty.

Stored bytes are the recorded sizes of its uploads (teachers, datasets) and of its jobs'
artifacts, and the files of its caches (teacher outputs, tokenised text)."""

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.auth import PrincipalDep
from app.dependencies import SessionDep, StoreDep
from app.models import Artifact, Dataset, Job, Teacher
from app.storage import ArtifactStore, keys

router = APIRouter(prefix="/v1", tags=["tenancy"])


class Usage(BaseModel):
    """Bytes a tenant stores, by kind."""

    teachers_bytes: int = Field(description="Uploaded teachers, as stored.")
    datasets_bytes: int = Field(description="Uploaded datasets, as stored.")
    artifacts_bytes: int = Field(description="Its jobs' students: every exported file.")
    cache_bytes: int = Field(description="Cached teacher outputs and tokenised text.")
    total_bytes: int


def stored_bytes_queries() -> dict[str, Select[str, int]]:
    """Per kind, a query of ``(tenant id, bytes)`` rows: the recorded sizes of the uploads and
    artifacts of every tenant (``distill_storage_bytes`` reads them too)."""
    return {
        "teachers": select(Teacher.tenant_id, func.sum(Teacher.size_bytes)).group_by(
            Teacher.tenant_id
        ),
        "datasets": select(Dataset.tenant_id, func.sum(Dataset.size_bytes)).group_by(
            Dataset.tenant_id
        ),
        "artifacts": select(Job.tenant_id, func.sum(Artifact.size_bytes))
        .join(Job, Job.id == Artifact.job_id)
        .group_by(Job.tenant_id),
    }


def cache_bytes(store: ArtifactStore, tenant_id: str) -> int:
    return store.size(keys.teacher_cache(tenant_id)) + store.size(keys.token_cache(tenant_id))


def usage(session: Session, store: ArtifactStore, tenant_id: str) -> Usage:
    """The tenant's stored bytes."""
    recorded = {}
    for kind, query in stored_bytes_queries().items():
        row = session.execute(query.where(query.selected_columns[0] == tenant_id)).first()
        recorded[kind] = 0 if row is None else int(row[1] or 0)
    cached = cache_bytes(store, tenant_id)
    return Usage(
        teachers_bytes=recorded["teachers"],
        datasets_bytes=recorded["datasets"],
        artifacts_bytes=recorded["artifacts"],
        cache_bytes=cached,
        total_bytes=sum(recorded.values()) + cached,
    )


@router.get("/usage", response_model=Usage)
def get_usage(principal: PrincipalDep, session: SessionDep, store: StoreDep) -> Usage:
    """The bytes the tenant stores: uploads, students, caches."""
    return usage(session, store, principal.tenant_id)


@router.delete("/cache", status_code=status.HTTP_204_NO_CONTENT)
def empty_cache(principal: PrincipalDep, store: StoreDep) -> Response:
    """Empty the tenant's caches (teacher outputs, tokenised text): a later job computes what
    it needs again. Entries a running job is writing are left to it."""
    for prefix in (keys.teacher_cache(principal.tenant_id), keys.token_cache(principal.tenant_id)):
        store.empty_cache(prefix)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
