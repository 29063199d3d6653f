"""Dependencies shared by the routers."""

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.db import get_session
from app.storage import ArtifactStore, get_store

# Requests holding a database session at once. Sync routes and their session's commit run on
# the threadpool (40 threads) in separate hops; if every thread could block waiting for the
# database (SQLite's one writer, PostgreSQL's pool of 15 connections), the writer's commit would
# wait for a thread that the waiters hold: a 30 s freeze, then 500s. Requests queue for a slot
# on the event loop instead, where waiting holds no thread. Below the pool size, at most a tenth
# of the threadpool.
DB_SLOTS = 4


# One limiter per event loop (a server has one; tests start several).
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]" = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def database_slot() -> AsyncIterator[None]:
    """Hold one of the event loop's ``DB_SLOTS`` while using the database."""
    loop = asyncio.get_running_loop()
    limiter = _slots.get(loop)
    if limiter is None:
        limiter = _slots[loop] = anyio.CapacityLimiter(DB_SLOTS)
    async with limiter:
        yield


async def db_slot() -> AsyncIterator[None]:
    async with database_slot():
        yield


def request_session(_: Annotated[None, Depends(db_slot, scope="function")]) -> Iterator[Session]:
    """The request's session (``get_session``), opened once the request holds a slot."""
    yield from get_session()


# scope="function": commit before the response is sent, so a client that reads back sees the row.
SessionDep = Annotated[Session, Depends(request_session, scope="function")]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
