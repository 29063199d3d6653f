"""The HTTP API. Every error leaves as RFC 9457 problem+json."""

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app import metrics
from app.auth import PRINCIPAL_STATE, AdminDep, bearer_token, principal_for
from app.config import MIB, get_settings
from app.datasets.router import router as datasets_router
from app.db import get_engine
from app.errors import (
    PROBLEM_JSON,
    AppError,
    InvalidInput,
    NotFound,
    Problem,
    find_unstorable,
    problem,
    problem_responses,
    unstorable_character,
)
from app.jobs.router import router as jobs_router
from app.logs import (
    REQUEST_ID_HEADER,
    RequestContextMiddleware,
    configure_logging,
    current_request_id,
)
from app.serving.router import router as serving_router
from app.serving.v2 import protocol_error_for
from app.serving.v2 import router as v2_router
from app.storage import STAGING_MAX_AGE_S, get_store
from app.teachers.router import router as teachers_router
from app.tenancy import router as tenancy_router
from app.ui import router as ui_router

log = logging.getLogger(__name__)
# A JSON body can only carry a NUL or a lone surrogate as an escape: bodies without one are not
# walked (a predict batch holds millions of numbers; this search costs about 3% of parsing them).
_ESCAPED_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def problem_response(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        problem(status, code, detail, **extra), status_code=status, media_type=PROBLEM_JSON
    )


def _refuse(found: tuple[str, str] | None, what: str = "`{field}`") -> None:
    """A 422 ``invalid_input`` for what ``find_unstorable`` found (``what`` names it)."""
    if found is not None:
        field, character = found
        raise InvalidInput(
            f"{what.format(field=field)} contains {character}, which cannot be stored; remove it.",
            field=field,
        )


async def refuse_unstorable_text(request: Request) -> None:
    """Every text a request carries that could reach the database (path ids, query values, form
    fields and file names, JSON strings) must be one a text column holds: no NUL, no lone
    surrogate. A path id holding one names nothing (404); any other text is a 422
    ``invalid_input`` naming its field. Runs before the route, after FastAPI parsed the body.
    """
    for name, value in request.path_params.items():
        character = isinstance(value, str) and unstorable_character(value)
        if character:
            raise NotFound(
                f"No resource has this {name}: it contains {character}, which no id holds.",
                field=name,
            )
    for name, value in request.query_params.multi_items():
        _refuse(find_unstorable(name, name) or find_unstorable(value, name))
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is None:
        return
    if isinstance(body_field.field_info, Form):
        # Parsed (within the route's limits) before dependencies run: this is the cached form.
        for name, value in (await request.form()).multi_items():
            if isinstance(value, UploadFile):
                _refuse(find_unstorable(value.filename or "", name), "The file name of `{field}`")
            else:
                _refuse(find_unstorable(name, name) or find_unstorable(value, name))
        return
    if _ESCAPED_UNSTORABLE.search(await request.body()):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return  # not JSON: the body's validation answers
        _refuse(find_unstorable(body, ""))


async def app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if v2 := protocol_error_for(request, exc.status, exc.detail):
        v2.headers.update(exc.headers)
        return v2
    return JSONResponse(
        exc.problem(), status_code=exc.status, media_type=PROBLEM_JSON, headers=exc.headers
    )


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    if v2 := protocol_error_for(request, 400, f"{field or 'request'}: {first['msg']}"):
        return v2
    return problem_response(
        422, "validation_error", f"{field or 'request'}: {first['msg']}", field=field, errors=errors
    )


def allowed_methods(app: FastAPI, path: str) -> str:
    """The methods some route answers at ``path`` (its OpenAPI paths; HEAD with GET), for a
    405's ``Allow``: every route at the path, not only the first that matched it."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods.update(method.upper() for method in operations)
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own errors (404, 405, 413...), keeping the headers it set."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allow = allowed_methods(request.app, request.url.path)
        if allow:
            headers["Allow"] = allow
    if v2 := protocol_error_for(request, exc.status_code, str(exc.detail)):
        v2.headers.update(headers)
        return v2
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return JSONResponse(
        problem(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)),
        status_code=exc.status_code,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request.unhandled_error", exc_info=exc)
    detail = "An unexpected error occurred; it has been logged."
    response = protocol_error_for(request, 500, detail) or problem_response(
        500, "internal_error", detail
    )
    # Answered outside RequestContextMiddleware, which cannot add the id here.
    if request_id := current_request_id():
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def document_problems(schema: dict[str, Any]) -> None:
    """Document, in an OpenAPI ``schema``, the problem+json answers every operation can give:
    422 (validation, text no column holds), 404 where the path names a resource, 400 and 413
    where there is a body, 401 where it takes an API key; routes declare their own others with
    ``problem_responses``. A server running without keys declares none."""
    if not get_settings().auth_required:
        schema.get("components", {}).pop("securitySchemes", None)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
        Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    schema["components"]["schemas"]["ProtocolError"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
        "description": "An Open Inference Protocol error.",
    }
    protocol_error = {
        "description": "The protocol's error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ProtocolError"}}},
    }
    for path, operations in schema["paths"].items():
        if path.startswith("/v2"):
            # The Open Inference Protocol's own errors: 400 for any bad request, 404 for an
            # unknown model or version, 503 for a server not ready.
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for status in [s for s in responses if s.startswith("4")]:
                    responses.pop(status)
                # 401: a route that takes an API key (its `security`) and got none or a bad one.
                errors = ["400", *(["401"] if "security" in operation else [])]
                errors += ["404"] if "{" in path else []
                errors += ["503"] if path.endswith("/ready") else []
                responses.update({status: protocol_error for status in errors})
                operation["responses"] = dict(sorted(responses.items()))
            continue
        for operation in operations.values():
            statuses = [422, *([401] if "security" in operation else [])]
            statuses += [404] if "{" in path else []
            statuses += [400, 413] if "requestBody" in operation else []
            responses = operation.setdefault("responses", {})
            responses.update({str(s): r for s, r in problem_responses(*statuses).items()})
            operation["responses"] = dict(sorted(responses.items()))
    # FastAPI's own 422 body, replaced above everywhere.
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in json.dumps(schema):
            schema["components"]["schemas"].pop(name, None)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """At start, remove uploads left in staging by a process that died while receiving them."""
    removed = get_store().clear_staging(older_than_s=STAGING_MAX_AGE_S)
    if removed:
        log.info("storage.staging_cleared", extra={"files": removed})
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    # The multipart body is spooled before a route runs: bound it here; routes check per kind.
    max_body = max(settings.max_teacher_bytes, settings.max_dataset_bytes) + MIB
    app = FastAPI(
        title="Distill",
        version="0.1.0",
        description="Knowledge distillation as a service: upload a teacher, get a small student.",
        max_body_size=max_body,
        lifespan=lifespan,
        dependencies=[Depends(refuse_unstorable_text)],
    )
    for router in (teachers_router, datasets_router, jobs_router, serving_router, tenancy_router):
        app.include_router(router)
    app.include_router(v2_router)
    app.include_router(ui_router)
    return add_common_parts(app)


# Methods whose requests carry a body that FastAPI reads (and parses) before any dependency.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _routed(scope: Scope) -> bool:
    """Whether a route takes this method at this path: one that does not is answered 404 or
    405 by the router, as without a key (every route that takes a body needs one)."""
    return any(route.matches(scope)[0] is Match.FULL for route in scope["app"].router.routes)


class AuthenticateFirst:
    """Where keys are required, a request with a body is authenticated before its body is read:
    without a key (or with a bad one) a 64 MiB upload is a 401 at once, not after the API has
    received and parsed it. The principal found is kept for ``current_principal``. Pure ASGI,
    so the body stays unread and streams to the route as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS and _routed(scope):
            request = Request(scope)
            try:
                principal = await principal_for(bearer_token(request.headers.get("authorization")))
            except AppError as e:
                await (await app_error_handler(request, e))(scope, receive, send)
                return
            setattr(request.state, PRINCIPAL_STATE, principal)
        await self.app(scope, receive, send)


def add_common_parts(app: FastAPI) -> FastAPI:
    """What every Distill app has (the API, and ``distill serve``'s): the error handlers, the
    health routes, and an OpenAPI document listing the problems each operation gives."""
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    configure_logging()
    app.add_middleware(AuthenticateFirst)  # inside the request context: its 401s are logged
    app.add_middleware(RequestContextMiddleware)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses=problem_responses(503))
    def readyz() -> JSONResponse:
        """The database answers."""
        try:
            with get_engine().connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            log.exception("readyz.database_unreachable")
            return problem_response(503, "not_ready", "The database does not answer.")
        return JSONResponse({"status": "ready"})

    exposition = {"schema": {"type": "string"}}
    metrics_formats = {"text/plain": exposition, "application/openmetrics-text": exposition}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {"description": "The exposition", "content": metrics_formats},
            **problem_responses(403),
        },
    )
    def prometheus_metrics(_: AdminDep, request: Request) -> Response:
        """Prometheus metrics: jobs as the database has them, and the serving and HTTP
        figures of every process of this deployment on this host. Needs an admin key."""
        content, content_type = metrics.render(request.headers.get("accept"))
        return Response(content, media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_problems(FastAPI.openapi(app))
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
