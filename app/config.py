"""Settings from environment variables (prefix ``DISTILL_``).

With nothing set, Distill runs embedded: a SQLite database, a filesystem Celery broker and a local
artifact directory, all under ``DISTILL_HOME``. Server mode sets
``DISTILL_DATABASE_URL`` (PostgreSQL) and ``DISTILL_BROKER_URL`` (Redis).
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    # `DISTILL_QUOTA_QUEUED_JOBS=none` (any optional setting): unset, whatever its default.
    model_config = SettingsConfigDict(
        env_prefix="DISTILL_", extra="ignore", env_parse_none_str="none"
    )

    home: Path = Path(".distill")
    database_url: str | None = None
    broker_url: str | None = None
    storage_dir: Path | None = None
    data_dir: Path | None = Field(
        default=None, description="Where builtin datasets are looked up and downloaded to."
    )

    max_teacher_bytes: int = 1024 * MIB
    max_dataset_bytes: int = 1024 * MIB
    max_predict_batch: int = 1024
    serve_max_batch: int = Field(
        default=64,
        ge=1,
        description="Concurrent requests to one served model are run together, up to this many "
        "samples per run (1: no micro-batching).",
    )
    serve_max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        description="While a served model is under load, how long a run waits for its batch to "
        "fill; a lone request never waits.",
    )
    serve_models_max_bytes: int = Field(
        default=1024 * MIB,
        description="Served models kept loaded (estimated from their file sizes), least recently "
        "used evicted first.",
    )
    teacher_cache_max_bytes: int = Field(
        default=20 * 1024 * MIB,
        description="Cached teacher outputs beyond this, per tenant, are evicted, least "
        "recently used first.",
    )
    max_teacher_feature_bytes: int = Field(
        default=4096 * MIB,
        description="Feature methods hold the teacher's hooked outputs for the whole training "
        "set in memory (the teacher then never runs per step); larger jobs are refused.",
    )

    preflight_max_bytes: int = Field(
        default=256 * MIB,
        description="A job whose teachers and uploaded dataset files together are at most this "
        "big is preflighted at submission (a 422 there); larger ones as the job's first step.",
    )

    # Resource budgets: each is checked before the memory or time is taken.
    max_activation_bytes: int = Field(
        default=1024 * MIB,
        description="A teacher whose forward pass on one sample needs more activation memory "
        "than this (computed from its shapes, without running it) is refused at upload.",
    )
    max_training_activation_bytes: int = Field(
        default=8192 * MIB,
        description="A job whose student needs more than this for one training batch's "
        "activations and their gradients (computed from shapes) is refused at submission.",
    )
    max_dataset_memory_bytes: int = Field(
        default=2048 * MIB,
        description="An uploaded dataset whose arrays decode to more than this is refused "
        "before decoding (the bound on the API's memory while it checks one).",
    )
    teacher_trial_timeout_s: float = Field(
        default=60.0,
        description="An uploaded graph is run once on a small batch in a separate process; "
        "past this it is killed and the upload refused.",
    )
    teacher_trial_memory_bytes: int = Field(
        default=4096 * MIB, description="The address-space limit of that trial process."
    )
    stall_timeout_s: float = Field(
        default=600.0,
        description="A job that shows no progress for this long (no teacher batch, training "
        "step or phase: a teacher stuck in one batch, say) fails as `stalled` and its process "
        "is ended, instead of holding its worker.",
    )
    cancel_grace_s: float = Field(
        default=10.0,
        description="A running job asked to cancel that has not stopped after this long has "
        "its process ended.",
    )
    latency_budget_s: float = Field(
        default=20.0, description="Time allowed for measuring one model's latency."
    )

    job_max_attempts: int = 3
    job_stale_after_s: float = Field(
        default=12,
        description="A running job whose heartbeat is older than this is requeued: its process "
        "is gone (a thread beats every `heartbeat_interval_s` whatever the job is doing).",
    )
    recovery_interval_s: float = 3.0
    job_time_limit_s: int = 24 * 3600
    heartbeat_interval_s: float = 2.0
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per worker process; default: the cores this process may "
        "use, divided among the worker's pool processes.",
    )

    auth: Literal["required", "disabled"] | None = Field(
        default=None,
        description="required: every route but health takes an API key (`Authorization: Bearer`); "
        "disabled: no keys, everything belongs to the `default` tenant. Default: required in "
        "server mode (DISTILL_DATABASE_URL set); disabled when embedded, where `distill up`, "
        "`api` and `serve` then refuse to listen beyond the loopback interface unless this is "
        "set to disabled explicitly.",
    )

    auth_cache_s: float = Field(
        default=5.0,
        ge=0.0,
        description="How long a process trusts a key it has checked before reading its row "
        "again (each read costs a database round trip on every request): a revoked key stops "
        "working within this. An expired key is refused at once.",
    )

    quota_queued_jobs: int | None = Field(
        default=100,
        ge=1,
        description="Jobs one tenant may have queued; beyond it a submission is a 429 "
        "(`queued_jobs_quota`) with Retry-After. `none`: no limit.",
    )
    quota_running_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Jobs of one tenant that may run at once; the others wait queued. Unset: "
        "as many as there are workers (the dispatch is fair among tenants either way).",
    )
    quota_storage_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Bytes one tenant may store (uploads, students, caches: GET /v1/usage). An "
        "upload that would pass it is a 507 (`storage_quota`), one larger than the whole quota "
        "a 413, and no job is accepted while the tenant is over it. Unset: no limit.",
    )
    quota_predict_rps: int | None = Field(
        default=None,
        ge=1,
        description="Predict and inference requests per second, per tenant, over a one-second "
        "sliding window (all API processes together in server mode, through Redis); beyond it "
        "a 429 with Retry-After. Every answer carries the RateLimit and RateLimit-Policy "
        "headers. Unset: no limit.",
    )
    artifact_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="A succeeded job's student files (every artifact format) are removed this "
        "many days after it finished; the job stays, with its result and metrics, and its "
        "downloads and served model answer 410 `artifacts_expired`. Checkpoints are always "
        "removed as a job ends. Unset: students are kept until their job is deleted.",
    )
    idempotency_ttl_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="How long an Idempotency-Key is remembered with its response.",
    )

    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="json: one JSON object per line (python-json-logger); text: plain lines. "
        "Default: json in server mode (DISTILL_DATABASE_URL set), text when embedded.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_dir: Path | None = Field(
        default=None,
        description="Where each API process writes its Prometheus samples (prometheus-client's "
        "multiprocess mode) for `/metrics` to merge: local to the host, one per deployment.",
    )

    @property
    def server_mode(self) -> bool:
        return self.database_url is not None

    @property
    def auth_required(self) -> bool:
        return self.auth == "required" if self.auth is not None else self.server_mode

    @property
    def resolved_log_format(self) -> Literal["json", "text"]:
        if self.log_format is not None:
            return self.log_format
        return "json" if self.server_mode else "text"

    @property
    def resolved_metrics_dir(self) -> Path:
        return (self.metrics_dir or self.home / "metrics").resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'distill.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.home / "data").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.home / "storage").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
