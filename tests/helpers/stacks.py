"""The two stacks the tests run on, and the servers behind the ``server`` one."""

import os
from dataclasses import dataclass
from pathlib import Path

from app import config, db, queue, storage
from app.models import DEFAULT_TENANT_ID

POSTGRES_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/15")


def clear_caches() -> None:
    for cached in (
        config.get_settings,
        db.get_engine,
        db.get_session_factory,
        storage.get_store,
        queue.get_celery,
    ):
        cached.cache_clear()


@dataclass(frozen=True)
class Stack:
    """``api_key``: an admin key of the tenant ``tests``, where the stack needs keys (server
    mode's default); its requests send ``headers`` and act for ``tenant_id``."""

    name: str
    env: dict[str, str]
    home: Path
    api_key: str | None = None
    tenant_id: str = DEFAULT_TENANT_ID

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}


def key_headers() -> dict[str, str]:
    """The stack's API key as a header, as the CLI and client send it (the ``stack`` fixture
    sets ``DISTILL_API_KEY`` where keys are required); none where they are not."""
    key = os.environ.get("DISTILL_API_KEY")
    return {} if not key else {"Authorization": f"Bearer {key}"}


def admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
