"""The two stacks the tests run on, and the servers behind the ``server`` one."""

import os
from dataclasses import dataclass
from pathlib import Path

from app import config, db, queue, storage

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
    name: str
    env: dict[str, str]
    home: Path


def admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
