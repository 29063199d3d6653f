"""Per-tenant quotas (``DISTILL_QUOTA_*``): queued jobs and stored bytes, checked where a job or an
upload is accepted; predict and inference requests per second, counted by the ``limits``
library (in memory, or in Redis in server mode so every API process shares one count).

Running jobs are bounded where a worker claims its next job (``repository.claim_next``).
"""

import asyncio
import logging
import math
import time
from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import PrincipalDep
from app.config import Settings
from app.db import lock_tenant
from app.dependencies import SettingsDep
from app.errors import InsufficientStorage, PayloadTooLarge, QuotaExceeded
from app.models import Job, JobStatus
from app.storage import ArtifactStore
from app.tenancy import usage

log = logging.getLogger(__name__)
# A queue of jobs drains at the pace of jobs (minutes); a client that was refused one should not
# poll faster than this.
QUEUE_RETRY_AFTER_S = 60
PREDICT_POLICY = "predict"


def check_queued_jobs(session: Session, tenant_id: str, settings: Settings) -> None:
    """Just before queueing one more of the tenant's jobs (late: the tenant stays locked until
    the commit). The tenant is locked first (``lock_tenant``), so concurrent submissions count
    one another.

    Raises:
        QuotaExceeded: 429 ``queued_jobs_quota``, with Retry-After.
    """
    limit = settings.quota_queued_jobs
    if limit is None:
        return
    lock_tenant(session, tenant_id)
    queued = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status == JobStatus.QUEUED)
    )
    if (queued or 0) >= limit:
        raise QuotaExceeded(
            f"The tenant has {queued} jobs queued, its limit (DISTILL_QUOTA_QUEUED_JOBS); "
            "submit more once some have started, or cancel some.",
            code="queued_jobs_quota",
            quota="queued_jobs",
            limit=limit,
            retry_after_s=QUEUE_RETRY_AFTER_S,
        )


def check_storage(
    session: Session, store: ArtifactStore, tenant_id: str, adding_bytes: int, settings: Settings
) -> None:
    """Before keeping ``adding_bytes`` more for the tenant (0: before accepting a job, whose
    student will be stored).

    Raises:
        PayloadTooLarge: 413 ``storage_quota``, more than the whole quota.
        InsufficientStorage: 507 ``storage_quota``, more than the quota has left.
    """
    limit = settings.quota_storage_bytes
    if limit is None:
        return
    if adding_bytes > limit:
        raise PayloadTooLarge(
            f"{adding_bytes} bytes (the upload's stored form) are more than the tenant's "
            "whole storage quota "
            f"(DISTILL_QUOTA_STORAGE_BYTES, {limit} bytes).",
            code="storage_quota",
            quota="storage_bytes",
            limit=limit,
        )
    used = usage(session, store, tenant_id).total_bytes
    if used + adding_bytes > limit or (adding_bytes == 0 and used >= limit):
        raise InsufficientStorage(
            f"The tenant stores {used} bytes of its {limit} (DISTILL_QUOTA_STORAGE_BYTES); "
            + (
                f"this upload needs {adding_bytes} more (its stored form). "
                if adding_bytes
                else "a job's student needs room beyond that. "
            )
            + "Delete finished jobs, datasets or "
            "teachers, or empty the cache (DELETE /v1/cache); GET /v1/usage shows what is "
            "stored.",
            quota="storage_bytes",
            limit=limit,
            used_bytes=used,
        )


@lru_cache(maxsize=8)
def _limiter(storage_uri: str, loop: asyncio.AbstractEventLoop) -> SlidingWindowCounterRateLimiter:
    """One per event loop: an asyncio Redis connection belongs to the loop that opened it."""
    storage: Storage
    if storage_uri.startswith("redis"):
        # redis-py's asyncio client (a dependency already), not the default coredis.
        storage = RedisStorage(f"async+{storage_uri}", implementation="redispy")
    else:
        storage = MemoryStorage()
    return SlidingWindowCounterRateLimiter(storage)


async def limit_predict_rate(principal: PrincipalDep, settings: SettingsDep) -> dict[str, str]:
    """FastAPI dependency of the predict and inference routes: count the request against the
    tenant's ``DISTILL_QUOTA_PREDICT_RPS`` over a one-second sliding window. Returns the
    RateLimit and RateLimit-Policy fields (draft-ietf-httpapi-ratelimit-headers) for the
    route's answer; none without a limit, or when the counter (Redis) cannot be reached: the
    request is then let through, and logged.

    Raises:
        QuotaExceeded: 429 ``predict_rate_quota``, with Retry-After and the same fields.
    """
    limit = settings.quota_predict_rps
    if limit is None:
        return {}
    item = RateLimitItemPerSecond(limit)
    limiter = _limiter(settings.broker_url or "memory://", asyncio.get_running_loop())
    try:
        allowed = await limiter.hit(item, principal.tenant_id)
        stats = await limiter.get_window_stats(item, principal.tenant_id)
    except Exception:
        # Redis unreachable: serving goes on uncounted (a quota protects the service, an
        # outage of its counter should not stop it); the log says so.
        log.exception("quota.predict_rate_unavailable")
        return {}
    reset_s = max(1, math.ceil(stats.reset_time - time.time()))
    headers = {
        "RateLimit-Policy": f'"{PREDICT_POLICY}";q={limit};w=1',
        "RateLimit": f'"{PREDICT_POLICY}";r={stats.remaining};t={reset_s}',
    }
    if not allowed:
        raise QuotaExceeded(
            f"More than {limit} predict requests in one second (DISTILL_QUOTA_PREDICT_RPS).",
            code="predict_rate_quota",
            quota="predict_rps",
            limit=limit,
            retry_after_s=reset_s,
            headers=headers,
        )
    return headers


PredictRate = Annotated[dict[str, str], Depends(limit_predict_rate)]
