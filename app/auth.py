"""API keys and tenants.

A key reads ``dsk_<prefix>_<secret>``: the public 8-character ``prefix`` finds its row, and the
whole key is checked against the row's Argon2id hash (argon2-cffi's RFC 9106 low-memory profile;
the key itself is never stored). A key belongs to one tenant and has a role (``admin`` also reads
the deployment's ``/metrics``), an optional expiry, and can be revoked; keys are made and revoked
with ``distill keys`` on the server, never over HTTP.

With authentication off (``DISTILL_AUTH``; the embedded default), every request acts for the
``default`` tenant with the admin role.
"""

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from threading import Lock
from typing import Annotated, Any

import anyio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import session_scope
from app.dependencies import database_slot
from app.errors import Forbidden, InvalidInput, InvalidKey, NotFound, Unauthorized
from app.models import DEFAULT_TENANT_ID, ApiKey, KeyRole, Tenant

KEY_PREFIX = "dsk_"
# Where a request's principal is kept once found (``request.state``).
PRINCIPAL_STATE = "principal"
_hasher = PasswordHasher()
# Checking a key's hash costs about 0.15 s of CPU: a process remembers the keys whose hash it
# has checked (by their SHA-256, in memory only). It also trusts the principal of a key read
# less than `auth_cache_s` ago, without reading its row (revocation) again.
_CACHED_MAX = 4096
_verified: "OrderedDict[str, str]" = OrderedDict()
_checked: "OrderedDict[str, tuple[float, Principal]]" = OrderedDict()
_cache_lock = Lock()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    tenant_id: str
    role: KeyRole
    key_id: str | None  # None with authentication off
    expires_at: datetime | None = None


ANONYMOUS = Principal(DEFAULT_TENANT_ID, KeyRole.ADMIN, None)


def _remember(cache: "OrderedDict[str, Any]", key: str, value: Any) -> None:
    with _cache_lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHED_MAX:
            cache.popitem(last=False)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created if new (``default`` is the one with auth off)."""
    if not name or len(name) > 64:
        raise InvalidInput("A tenant name has 1 to 64 characters.", field="tenant")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        if name == DEFAULT_TENANT_ID:
            tenant.id = DEFAULT_TENANT_ID
        session.add(tenant)
        session.flush()
    return tenant


def create_key(
    session: Session,
    tenant: str,
    role: KeyRole = KeyRole.MEMBER,
    *,
    name: str = "",
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key for the tenant called ``tenant`` (created if new); returns its row and the key,
    which is shown once and never stored."""
    prefix = secrets.token_hex(4)
    token = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        tenant_id=get_or_create_tenant(session, tenant).id,
        prefix=prefix,
        hash=_hasher.hash(token),
        role=role,
        name=name,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, token


def list_keys(session: Session, tenant: str | None = None) -> list[tuple[ApiKey, str]]:
    """Keys (with their tenant's name), newest first; only ``tenant``'s if given."""
    query = select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at.desc())
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    return [(row.ApiKey, row.name) for row in session.execute(query)]


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke the key whose prefix is ``prefix`` (the ``dsk_`` is optional); it stops working at
    once. Raises NotFound."""
    prefix = prefix.removeprefix(KEY_PREFIX).split("_", 1)[0]
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFound(f"No key has the prefix {prefix!r}.", field="prefix")
    if key.revoked_at is None:
        key.revoked_at = _now()
    return key


def _verified_hash(row: ApiKey, token: str) -> bool:
    digest = _digest(token)
    known = _verified.get(digest)
    if known is not None:
        return hmac.compare_digest(known, row.hash)
    try:
        _hasher.verify(row.hash, token)
    except (VerificationError, InvalidHashError):
        return False
    _remember(_verified, digest, row.hash)
    return True


def authenticate(session: Session, token: str) -> Principal:
    """The principal of ``token``. Raises InvalidKey (401) for a key that is malformed, unknown,
    expired or revoked: the detail says which, never whether a prefix exists."""
    prefix, _, secret = token.removeprefix(KEY_PREFIX).partition("_")
    row = None
    if token.startswith(KEY_PREFIX) and secret:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or not _verified_hash(row, token):
        raise InvalidKey("This API key is not valid.")
    if row.revoked_at is not None:
        raise InvalidKey("This API key has been revoked.", code="key_revoked")
    if row.expires_at is not None and row.expires_at <= _now():
        raise InvalidKey("This API key has expired.", code="key_expired")
    return Principal(row.tenant_id, KeyRole(row.role), row.id, row.expires_at)


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (`distill keys create`), unless the server runs without them.",
)


async def principal_for(token: str | None) -> Principal:
    """Who a request with this bearer token (None: no ``Authorization: Bearer``) acts for.
    Raises Unauthorized (401, with ``WWW-Authenticate``) when keys are required and none (or a
    bad one) was sent."""
    settings = get_settings()
    if not settings.auth_required:
        return ANONYMOUS
    if token is None:
        raise Unauthorized(
            "This server needs an API key: send `Authorization: Bearer <key>` "
            "(`distill keys create` on the server makes one)."
        )
    digest, now = _digest(token), time.monotonic()
    hit = _checked.get(digest)
    if hit is not None and now - hit[0] < settings.auth_cache_s:
        principal = hit[1]
        if principal.expires_at is None or principal.expires_at > _now():
            return principal

    def check() -> Principal:
        with session_scope() as session:
            return authenticate(session, token)

    # The read waits for a database slot as a request's session does (app.dependencies).
    async with database_slot():
        principal = await anyio.to_thread.run_sync(check)
    _remember(_checked, digest, (now, principal))
    return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (the scheme in any case)."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Who the request acts for: found before its body was read (``authenticate_first`` in
    app.main), else now. Raises Unauthorized (401)."""
    found: Principal | None = getattr(request.state, PRINCIPAL_STATE, None)
    if found is not None:
        return found
    return await principal_for(None if credentials is None else credentials.credentials)


async def admin_principal(
    principal: Annotated[Principal, Depends(current_principal)],
) -> Principal:
    """The request's principal, which must have the admin role. Raises Forbidden (403)."""
    if principal.role != KeyRole.ADMIN:
        raise Forbidden("This needs a key with the admin role.")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
