"""Logging for every Distill process: one JSON object per line (or plain text), each carrying
the context it was written in: ``request_id`` while an HTTP request is handled, ``job_id`` (and
``attempt``) while a job is.

``configure_logging`` installs one handler on the root logger (the API at app creation, the
Celery worker through its ``setup_logging`` signal, a job's process at its start). Context comes
from ``log_context`` (a context variable: per request, per task) and ``bind_process`` (the whole
process, its threads included: a job's process is one job). A log call's own ``extra`` wins.
"""

import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, get_settings
from app.metrics import observe_http_request

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming request id is kept when it looks like an id (a UUID, a trace id...), else replaced:
# it is echoed in a header and written to every line, so nothing else may pass.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Polled by orchestrators and Prometheus every few seconds: their lines are DEBUG.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
CONTEXT_KEYS = ("request_id", "job_id", "attempt")
_PARAMETER = re.compile(r"{(\w+)(?::\w+)?}")  # in a route's path, with its convertor

_context: ContextVar[Mapping[str, object]] = ContextVar(
    "distill_log_context", default=MappingProxyType({})
)
_process_context: dict[str, object] = {}
http_log = logging.getLogger("app.http")


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Lines logged inside carry ``fields`` (in this task or thread only)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_process(**fields: object) -> None:
    """Every line this process logs from now on carries ``fields``, from any thread (a field
    given as None is dropped)."""
    _process_context.update(fields)
    for key in [key for key, value in fields.items() if value is None]:
        del _process_context[key]


def current_context() -> dict[str, object]:
    """The fields a line logged here would carry."""
    return {**_process_context, **_context.get()}


def current_request_id() -> str | None:
    """The id of the HTTP request being handled here, if any."""
    request_id = _context.get().get("request_id")
    return request_id if isinstance(request_id, str) else None


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_context().items():
            record.__dict__.setdefault(key, value)
        return True


class _TextFormatter(logging.Formatter):
    """Plain lines, the context fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        context = "".join(
            f" {key}={record.__dict__[key]}" for key in CONTEXT_KEYS if key in record.__dict__
        )
        return super().format(record) + context


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at each record (a test's capture, a redirect),
    not the stream it was when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``DISTILL_LOG_FORMAT``: ``json`` or ``text``."""
    if log_format == "json":
        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            # uvicorn's copy of its message with terminal colour codes
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
    return _TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def configure_logging(settings: Settings | None = None) -> None:
    """Send every logger's records to stderr in the configured format, replacing the handler a
    previous call installed (handlers others added, a test's capture, stay). uvicorn's loggers
    go through it too; its access lines are dropped for ``http.request`` lines, which carry
    the request id and the route."""
    settings = settings or get_settings()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(make_formatter(settings.resolved_log_format))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-ID`` if it looks like an id, else a new one."""
    given = headers.get(REQUEST_ID_HEADER.lower(), "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _route_of(scope: Scope) -> str:
    """The matched route's template (``/v1/jobs/{job_id}``: bounded, unlike paths). The route
    may hold only its own part of it (in an included router): its router's prefix, which names
    no parameter here, is the rest of the path."""
    template = getattr(scope.get("route"), "path", None)
    if scope.get("endpoint") is None or not isinstance(template, str):
        return "unmatched"
    params = scope.get("path_params", {})
    filled = _PARAMETER.sub(lambda m: str(params.get(m.group(1), m.group(0))), template)
    path: str = scope["path"]
    prefix = path.removesuffix(filled) if path.endswith(filled) else ""
    return prefix + _PARAMETER.sub(r"{\1}", template)


class RequestContextMiddleware:
    """Gives each HTTP request an id (the client's ``X-Request-ID`` if sane), logs inside it
    with that id, echoes it in the response's ``X-Request-ID``, and ends with one
    ``http.request`` line (method, path, route, status, duration) and its metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = request_id_from(headers)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        token = _context.set({**_context.get(), "request_id": request_id})
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = _route_of(scope)
            observe_http_request(scope["method"], route, status, seconds)
            http_log.log(
                logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO,
                "http.request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )
        # Only here, not when the app raised: the 500 handler then runs outside this
        # middleware, in this request's task (whose context ends with it), and its line must
        # carry the id too.
        _context.reset(token)
