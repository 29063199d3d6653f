"""The serving-only app (``distill serve``): the Open Inference Protocol routes, ``/v1/jobs/{id}
/predict`` and health, nothing else. Stateless: it reads the database and the artifact storage
that the API and workers write, so any number can run beside them."""

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.exceptions import HTTPException

from app.db import get_engine
from app.errors import AppError, problem_responses
from app.main import (
    app_error_handler,
    document_problems,
    http_error_handler,
    problem_response,
    refuse_unstorable_text,
    unexpected_error_handler,
    validation_error_handler,
)
from app.serving.router import predict_router, router
from app.serving.v2 import router as v2_router


def create_serving_app() -> FastAPI:
    app = FastAPI(
        title="Distill serving",
        version="0.1.0",
        description="Distill's students, served: Open Inference Protocol v2 and /predict.",
        dependencies=[Depends(refuse_unstorable_text)],
    )
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.include_router(predict_router, prefix=router.prefix)
    app.include_router(v2_router)

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
        except Exception as e:
            return problem_response(503, "not_ready", f"database unreachable: {e}")
        return JSONResponse({"status": "ready"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_problems(FastAPI.openapi(app))
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
