"""Engine and sessions. Requests get one session that commits or rolls back (``get_session``);
the worker opens short ones with ``session_scope`` and never holds one across training."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings
from app.models import Tenant
from app.queue import send_pending


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def lock_rows(session: Session, model: Any, ids: Iterable[str], *, exclusive: bool) -> set[str]:
    """Lock these rows of ``model`` (a table with an ``id``) until the transaction ends; returns
    the ids that still exist.

    Submitting a job takes a shared lock on its teachers and dataset, deleting one an exclusive
    one: whichever comes second waits for the other's commit, then sees it (the job, or the row's
    absence). On PostgreSQL these are row locks (``FOR KEY SHARE``: submissions do not wait for
    one another; ``FOR UPDATE``); SQLite has one writer at a time, so both take its write lock,
    with a write that changes nothing, and hold it to the commit.
    """
    ids = sorted(set(ids))
    query = select(model.id).where(model.id.in_(ids))
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(model)
            .where(model.id.in_(ids))
            .values(id=model.id)
            .execution_options(synchronize_session=False)
        )
    else:
        query = query.with_for_update(read=not exclusive, key_share=not exclusive)
    return set(session.scalars(query))


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this tenant's submissions and claims until the transaction ends: on
    PostgreSQL ``FOR NO KEY UPDATE`` on its row (the rows that reference it can still be
    inserted); on SQLite the write lock, taken with a write that changes nothing."""
    if session.get_bind().dialect.name == "sqlite":
        lock_rows(session, Tenant, [tenant_id], exclusive=True)
    else:
        session.execute(
            select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
        )


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: the request owns the transaction; services only flush."""
    with get_session_factory()() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        send_pending(session)


@contextmanager
def session_scope() -> Iterator[Session]:
    with get_session_factory()() as session:
        with session.begin():
            yield session
        send_pending(session)
