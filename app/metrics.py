"""Prometheus metrics for ``GET /metrics``, correct however many API processes answer it.

Two kinds, merged at each scrape:

- What the database knows (jobs by status, the queue, job durations) is read from it at scrape
  time by ``JobsCollector``: every process reports the same truth, whichever one is scraped.
- What one process sees (predict latency, micro-batch sizes, loaded models, HTTP requests) is
  written by each process to its own files in ``DISTILL_METRICS_DIR`` (prometheus-client's
  multiprocess mode) and summed over them by ``MultiProcessCollector``. Counters and histograms
  of processes that ended stay in the sums; the gauges of processes no longer alive are
  dropped (``mark_process_dead``) at each scrape and when a process reusing their pid starts.
"""

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Engine, Float, case, extract, func, select, type_coerce
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute

from app.config import get_settings
from app.db import get_engine
from app.models import TERMINAL_STATUSES, Job, JobPhase, JobStatus, Tenant, utcnow
from app.tenancy import stored_bytes_queries

log = logging.getLogger(__name__)

PREDICT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


@dataclass(frozen=True)
class ProcessMetrics:
    """This process's metrics, written to its files in the metrics directory."""

    directory: Path
    predict_seconds: Histogram
    batch_size: Histogram
    models_loaded: Gauge
    models_loaded_bytes: Gauge
    model_loads: Counter
    model_evictions: Counter
    http_requests: Counter
    http_seconds: Histogram


@lru_cache
def process_metrics() -> ProcessMetrics:
    """The process's metrics, made at first use in the directory the settings name then (kept
    for the process's life: its files stay open)."""
    directory = get_settings().resolved_metrics_dir
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus-client picks its value class when imported, from this variable; it is set only
    # now (the settings may name the directory after that import), so pick again.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    # Gauges a dead process with this pid left (a restart in a container reuses pids) would
    # otherwise be read back as this process's.
    multiprocess.mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]
    model = ["model", "version"]
    return ProcessMetrics(
        directory=directory,
        predict_seconds=Histogram(
            "distill_predict_duration_seconds",
            "Time to answer one predict or inference request on the serving engine (queueing, "
            "micro-batching and the run), by model (job id) and version.",
            model,
            buckets=PREDICT_BUCKETS,
            registry=None,
        ),
        batch_size=Histogram(
            "distill_serving_batch_size",
            "Samples per serving run (a micro-batch of concurrent requests to one model).",
            buckets=BATCH_BUCKETS,
            registry=None,
        ),
        models_loaded=Gauge(
            "distill_serving_models_loaded",
            "Students loaded in the serving engines of live processes.",
            multiprocess_mode="livesum",
            registry=None,
        ),
        models_loaded_bytes=Gauge(
            "distill_serving_models_loaded_bytes",
            "Estimated memory of the students loaded in live processes.",
            multiprocess_mode="livesum",
            registry=None,
        ),
        model_loads=Counter(
            "distill_serving_model_loads",
            "Students loaded (and warmed up) by the serving engines.",
            registry=None,
        ),
        model_evictions=Counter(
            "distill_serving_model_evictions",
            "Students evicted from the serving engines (least recently used, over memory).",
            registry=None,
        ),
        http_requests=Counter(
            "distill_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=None,
        ),
        http_seconds=Histogram(
            "distill_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=None,
        ),
    )


def observe_predict(key: tuple[str, str], seconds: float) -> None:
    """One request to the model ``key`` (job id, version) took ``seconds``."""
    process_metrics().predict_seconds.labels(*key).observe(seconds)


def observe_batch(samples: int) -> None:
    """One serving run of ``samples`` samples."""
    process_metrics().batch_size.observe(samples)


def model_loaded(estimated_bytes: int) -> None:
    """A serving engine loaded a student of ``estimated_bytes``."""
    metrics = process_metrics()
    metrics.model_loads.inc()
    metrics.models_loaded.inc()
    metrics.models_loaded_bytes.inc(estimated_bytes)


def model_unloaded(estimated_bytes: int, *, evicted: bool) -> None:
    """A serving engine let a student of ``estimated_bytes`` go (``evicted``: for room)."""
    metrics = process_metrics()
    if evicted:
        metrics.model_evictions.inc()
    metrics.models_loaded.dec()
    metrics.models_loaded_bytes.dec(estimated_bytes)


def observe_http_request(method: str, route: str, status: int, seconds: float) -> None:
    """One HTTP request answered."""
    metrics = process_metrics()
    metrics.http_requests.labels(method, route, str(status)).inc()
    metrics.http_seconds.labels(method, route).observe(seconds)


def mark_dead_processes(directory: Path) -> None:
    """Drop the live gauges of this host's processes that have ended."""
    pids = {int(m.group(1)) for p in directory.iterdir() if (m := _LIVE_GAUGE_FILE.match(p.name))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


def _seconds_between(
    engine: Engine,
    start: InstrumentedAttribute[datetime | None],
    end: InstrumentedAttribute[datetime | None],
) -> ColumnElement[float]:
    """``end - start`` in seconds, in SQL (each backend has its own date arithmetic)."""
    if engine.dialect.name == "sqlite":
        return type_coerce((func.julianday(end) - func.julianday(start)) * 86400.0, Float)
    return type_coerce(extract("epoch", end - start), Float)


class JobsCollector(Collector):
    """Jobs as the database has them, read at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "distill_database_up", "Whether the database answered this scrape's queries."
        )
        try:
            families = self._families()
        except SQLAlchemyError:
            log.exception("metrics.database_unreachable")
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _families(self) -> list[Metric]:
        seconds = _seconds_between(self.engine, Job.started_at, Job.finished_at)
        with self.engine.connect() as connection:
            counts = dict(
                connection.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            oldest = connection.execute(
                select(func.min(func.coalesce(Job.enqueued_at, Job.created_at))).where(
                    Job.status == JobStatus.QUEUED
                )
            ).scalar()
            durations = connection.execute(
                select(
                    Job.status,
                    func.count(),
                    func.coalesce(func.sum(seconds), 0.0),
                    *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_BUCKETS),
                )
                .where(
                    Job.status.in_(list(TERMINAL_STATUSES)),
                    Job.started_at.is_not(None),
                    Job.finished_at.is_not(None),
                )
                .group_by(Job.status)
            ).all()
            phase_row = connection.execute(
                select(*(c for phase in PHASES for c in _histogram_columns(_phase_time(phase))))
                .select_from(Job)
                .where(Job.status.in_(list(TERMINAL_STATUSES)))
            ).one()
            tenants = dict(connection.execute(select(Tenant.id, Tenant.name)).all())
            stored = {
                kind: connection.execute(query).all()
                for kind, query in stored_bytes_queries().items()
            }

        storage = GaugeMetricFamily(
            "distill_storage_bytes",
            "Bytes stored per tenant: uploaded teachers and datasets, and job artifacts "
            "(caches not included; GET /v1/usage has them).",
            labels=["tenant", "kind"],
        )
        for kind, rows in stored.items():
            for tenant_id, size in rows:
                storage.add_metric([tenants.get(tenant_id, tenant_id), kind], int(size or 0))
        jobs = GaugeMetricFamily(
            "distill_jobs", "Jobs in the database, by status.", labels=["status"]
        )
        for status in [*JobStatus, *sorted(set(counts) - set(JobStatus))]:
            jobs.add_metric([str(status)], counts.get(status, 0))
        depth = GaugeMetricFamily(
            "distill_job_queue_depth", "Jobs queued in the database, not yet claimed by a worker."
        )
        depth.add_metric([], counts.get(JobStatus.QUEUED, 0))
        age = GaugeMetricFamily(
            "distill_job_queue_oldest_age_seconds",
            "How long ago the longest-waiting queued job was sent to the queue (0: none queued).",
        )
        waited = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        age.add_metric([], max(0.0, waited))
        histogram = HistogramMetricFamily(
            "distill_job_duration_seconds",
            "Run time of finished jobs' last attempt (started to finished), by final status.",
            labels=["status"],
        )
        for status, count, total, *cumulative in durations:
            buckets = [
                (str(float(b)), int(c or 0)) for b, c in zip(JOB_BUCKETS, cumulative, strict=True)
            ]
            histogram.add_metric([status], [*buckets, ("+Inf", int(count))], float(total))
        by_phase = HistogramMetricFamily(
            "distill_job_phase_duration_seconds",
            "Time finished jobs' last attempt spent in each phase (validating, teacher_outputs, "
            "training, evaluating, exporting).",
            labels=["phase"],
        )
        width = len(JOB_BUCKETS) + 2
        for i, phase in enumerate(PHASES):
            count, total, *cumulative = phase_row[i * width : (i + 1) * width]
            buckets = [
                (str(float(b)), int(c or 0)) for b, c in zip(JOB_BUCKETS, cumulative, strict=True)
            ]
            by_phase.add_metric([phase], [*buckets, ("+Inf", int(count))], float(total))
        return [jobs, depth, age, histogram, by_phase, storage]


# The phases a job spends time in (`queued` is the queue's age; `done` is the end).
PHASES = [p for p in JobPhase if p not in (JobPhase.QUEUED, JobPhase.DONE)]


def _phase_time(phase: JobPhase) -> ColumnElement[float]:
    """A job's seconds in ``phase``, from its ``phase_seconds`` JSON (NULL if it has none)."""
    seconds: ColumnElement[float] = Job.phase_seconds[phase.value].as_float()
    return seconds


def _histogram_columns(seconds: ColumnElement[float]) -> list[ColumnElement[Any]]:
    """count, sum, then the cumulative count of each of ``JOB_BUCKETS``, over the rows where
    ``seconds`` is not NULL."""
    return [
        func.count(seconds),
        func.coalesce(func.sum(seconds), 0.0),
        *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_BUCKETS),
    ]


def render(accept: str | None) -> tuple[bytes, str]:
    """The exposition for a scrape (the format its ``Accept`` asks for) and its content type."""
    metrics = process_metrics()
    mark_dead_processes(metrics.directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics.directory))  # type: ignore[no-untyped-call]
    registry.register(JobsCollector(get_engine()))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
