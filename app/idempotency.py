"""Idempotency keys (draft-ietf-httpapi-idempotency-key-header) on the POSTs that create:
``/v1/jobs``, ``/v1/teachers``, ``/v1/datasets``.

A request may carry ``Idempotency-Key``: the tenant's key is recorded with the request's target
(``POST /v1/jobs``) and fingerprint (``fingerprint``) before the work starts, in a transaction
of its own, so that of two requests with one new key exactly one does the work. Then, for
``settings.idempotency_ttl_s``, the same key with

- the same request, answered: the first answer again (status, JSON body, ``Location``), with
  ``Idempotent-Replayed: true``, and nothing done;
- the same request, still being answered: 409 ``idempotency_key_in_use``;
- another body or another route: 422 ``idempotency_key_reused``.

Only a success (2xx) is kept. A request that fails (a 4xx or 5xx, its body's validation and its
commit included) releases its key: the client may fix the request and send it again under the
same key, which is what a key is for (a failure changed nothing to protect). An expired key is a
new one: its row is deleted with the tenant's other expired rows when the tenant next sends a key;
so is a key left unanswered for ``IN_PROGRESS_LEASE_S`` (its API process died mid-request).
"""

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import UploadFile

from app.auth import PrincipalDep
from app.config import MIB, get_settings
from app.db import session_scope
from app.dependencies import database_slot
from app.errors import AppError, Conflict, InvalidInput
from app.models import IdempotentRequest, utcnow

REPLAYED_HEADER = "Idempotent-Replayed"
# Headers of the first answer that describe its result, kept to be sent again with it.
KEPT_HEADERS = ("location",)
MAX_KEY_LENGTH = 255
# The largest non-form body read for its fingerprint: the JSON routes take at most 1 MiB.
MAX_READ_BYTES = MIB
# A key still unanswered this long after its request began was left by a process that died while
# answering (a request's work, an upload's checks or a Hub fetch included, takes far less): it is
# free again, rather than a 409 until it expires.
IN_PROGRESS_LEASE_S = 3600
FORM_TYPES = {"multipart/form-data", "application/x-www-form-urlencoded"}
# The draft's syntax, a Structured Field String (RFC 9651): printable ASCII in quotes, with
# backslash escaping only a quote or a backslash.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")

M = TypeVar("M", bound=BaseModel)


class InvalidIdempotencyKey(AppError):
    status, code, title = 400, "invalid_idempotency_key", "Invalid Idempotency-Key"


class IdempotencyKeyInUse(Conflict):
    code, title = "idempotency_key_in_use", "Idempotency-Key in use"


class IdempotencyKeyReused(InvalidInput):
    code, title = "idempotency_key_reused", "Idempotency-Key reused"


def parse_key(value: str) -> str:
    """The key a header value names: the draft's quoted String (``"8e03978e-..."``), or the bare
    value as most clients send it (``8e03978e-...``), both the same key. 1 to 255 printable
    ASCII characters, else ``InvalidIdempotencyKey``."""
    key: str | None = value
    if value.startswith('"'):
        match = _SF_STRING.fullmatch(value)
        key = None if match is None else re.sub(r'\\(["\\])', r"\1", match.group(1))
    if key is None or _KEY.fullmatch(key) is None:
        raise InvalidIdempotencyKey(
            f"An Idempotency-Key is 1 to {MAX_KEY_LENGTH} printable ASCII characters, bare or "
            'quoted ("...").',
            field="Idempotency-Key",
        )
    return key


def _file_sha256(file: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(1 << 20):
        digest.update(chunk)
    file.seek(0)  # the route reads the upload next
    return digest.hexdigest()


async def fingerprint(request: Request) -> str:
    """SHA-256 of what the request asks, whatever its encoding: a form's fields (name, value)
    and files (name, filename, SHA-256 of the content), sorted, so neither the multipart
    boundary nor the parts' order counts; a JSON body parsed and written again with sorted keys
    and no spaces, so neither whitespace nor key order counts; any other body of at most
    ``MAX_READ_BYTES`` as its bytes; a larger one is not read."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        # The route's form, parsed (and cached on the request) before the dependencies run.
        parts = []
        for name, value in (await request.form()).multi_items():
            if isinstance(value, UploadFile):
                digest = await anyio.to_thread.run_sync(_file_sha256, value.file)
                parts.append(["file", name, value.filename or "", digest])
            else:
                parts.append(["field", name, value])
        canonical = json.dumps(sorted(parts)).encode()
    elif _small(request):
        canonical = await request.body()
        try:
            parsed = json.loads(canonical)
            canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
        except (ValueError, RecursionError):  # not JSON (the route refuses it): the bytes
            pass
    else:
        # A body no route here takes (a form route's JSON, a large or unsized one): not read,
        # as the route does not read it either; the route's 4xx then frees the key.
        canonical = f"unread {content_type}".encode()
    return hashlib.sha256(canonical).hexdigest()


def _small(request: Request) -> bool:
    """Whether the body is declared at most ``MAX_READ_BYTES`` long."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) <= MAX_READ_BYTES


@dataclass(frozen=True)
class _Request:
    tenant_id: str
    key: str
    target: str
    fingerprint: str


@dataclass(frozen=True)
class _Answer:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


def _record(request: _Request) -> IdempotentRequest:
    """The key's row: a new one, in progress (``status_code`` None) and committed, for a key
    not seen (or expired); else the answered one to replay. Raises ``IdempotencyKeyReused``
    or ``IdempotencyKeyInUse``."""
    now = utcnow()
    with session_scope() as session:
        # The tenant's expired keys first (this one's included, which makes it new), and
        # those whose request was never answered (its process died); the write also
        # serializes SQLite's writers from here.
        abandoned = IdempotentRequest.status_code.is_(None) & (
            IdempotentRequest.created_at <= now - timedelta(seconds=IN_PROGRESS_LEASE_S)
        )
        session.execute(
            delete(IdempotentRequest).where(
                IdempotentRequest.tenant_id == request.tenant_id,
                (IdempotentRequest.expires_at <= now) | abandoned,
            )
        )
        row = session.scalar(
            select(IdempotentRequest).where(
                IdempotentRequest.tenant_id == request.tenant_id,
                IdempotentRequest.key == request.key,
            )
        )
        if row is None:
            row = IdempotentRequest(
                tenant_id=request.tenant_id,
                key=request.key,
                target=request.target,
                fingerprint=request.fingerprint,
                created_at=now,
                expires_at=now + timedelta(seconds=get_settings().idempotency_ttl_s),
            )
            session.add(row)
            return row
    if (row.target, row.fingerprint) != (request.target, request.fingerprint):
        used = "with another body" if row.target == request.target else f"for {row.target}"
        raise IdempotencyKeyReused(
            f"This Idempotency-Key was used {used}: a new request needs a new key."
        )
    if row.status_code is None:
        raise IdempotencyKeyInUse(
            "A request with this Idempotency-Key is still being answered: retry once it is."
        )
    return row


def _claim(request: _Request) -> IdempotentRequest:
    try:
        return _record(request)
    except IntegrityError:
        # A request with the same key inserted its row first: now there is one to compare with.
        return _record(request)


def _settle(row_id: int, answer: _Answer | None) -> None:
    """Keep a success's answer on the key's row, or delete the row (release the key)."""
    with session_scope() as session:
        if answer is None:
            session.execute(delete(IdempotentRequest).where(IdempotentRequest.id == row_id))
        else:
            session.execute(
                update(IdempotentRequest)
                .where(IdempotentRequest.id == row_id)
                .values(
                    status_code=answer.status_code, response=answer.body, headers=answer.headers
                )
            )


def _replay(row: IdempotentRequest) -> Response:
    assert row.status_code is not None
    return JSONResponse(
        row.response,
        status_code=row.status_code,
        headers={**(row.headers or {}), REPLAYED_HEADER: "true"},
    )


@dataclass
class Idempotency:
    """A route's side of its request's key: return ``replay`` where there is one (the first
    answer again), else do the work and return the body through ``remember``."""

    replay: Response | None = None
    body: dict[str, Any] | None = field(default=None, init=False)

    def remember(self, out: M) -> M:
        """``out``, the success's body, kept (with the status and ``Location``) for replays."""
        self.body = out.model_dump(mode="json", by_alias=True)
        return out


async def idempotency(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A key naming this request (1 to 255 printable ASCII characters, e.g. a "
            'UUID, bare or quoted: `"..."`), so that sending it again does not do the work '
            "twice: the first success is answered again, with `Idempotent-Replayed: true`, for "
            "`DISTILL_IDEMPOTENCY_TTL_S` (24 h by default). The same key with another request "
            "is a 422, and while the first is being answered a 409. A failed request leaves the "
            "key free.",
        ),
    ] = None,
) -> AsyncIterator[Idempotency]:
    """The request's ``Idempotency``, its key claimed before the route runs (a scope="function"
    dependency ahead of the session, so it ends after the session has committed): a success
    leaves its answer on the key, any exception (the commit's too) releases it."""
    if key is None:
        yield Idempotency()
        return
    route = request.scope["route"]
    claim = _Request(
        principal.tenant_id,
        parse_key(key),
        f"{request.method} {route.path}",
        await fingerprint(request),
    )
    async with database_slot():
        row = await anyio.to_thread.run_sync(_claim, claim)
    if row.status_code is not None:
        yield Idempotency(replay=_replay(row))
        return
    outcome = Idempotency()
    answer = None
    try:
        yield outcome
        if outcome.body is not None:
            headers = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
            answer = _Answer(response.status_code or route.status_code, outcome.body, headers)
    finally:
        # Shielded: a cancelled request must still release its key.
        with anyio.CancelScope(shield=True):
            async with database_slot():
                await anyio.to_thread.run_sync(_settle, row.id, answer)


# Listed before the route's SessionDep: it then ends after the session's commit.
IdempotencyDep = Annotated[Idempotency, Depends(idempotency, scope="function")]
