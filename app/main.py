"""The HTTP API. Every error leaves as RFC 9457 problem+json."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.exceptions import HTTPException

from app.config import MIB, get_settings
from app.datasets.router import router as datasets_router
from app.db import get_engine
from app.errors import AppError, problem
from app.jobs.router import router as jobs_router
from app.serving.router import router as serving_router
from app.teachers.router import router as teachers_router

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem_response(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        problem(status, code, detail, **extra), status_code=status, media_type=PROBLEM_JSON
    )


async def app_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse(exc.problem(), status_code=exc.status, media_type=PROBLEM_JSON)


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    return problem_response(
        422, "validation_error", f"{field or 'request'}: {first['msg']}", field=field, errors=errors
    )


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return problem_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
    )


async def unexpected_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("request.unhandled_error", exc_info=exc)
    return problem_response(
        500, "internal_error", "An unexpected error occurred; it has been logged."
    )


def create_app() -> FastAPI:
    settings = get_settings()
    # The multipart body is spooled before a route runs: bound it here; routes check per kind.
    max_body = max(settings.max_teacher_bytes, settings.max_dataset_bytes) + MIB
    app = FastAPI(
        title="Distill",
        version="0.1.0",
        description="Knowledge distillation as a service: upload a teacher, get a small student.",
        max_body_size=max_body,
    )
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    for router in (teachers_router, datasets_router, jobs_router, serving_router):
        app.include_router(router)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """The database answers."""
        try:
            with get_engine().connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as e:
            return problem_response(503, "not_ready", f"database unreachable: {e}")
        return JSONResponse({"status": "ready"})

    return app
