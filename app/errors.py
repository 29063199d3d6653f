"""Expected errors carry their HTTP status and a machine-readable code. ``problem`` builds the one
RFC 9457 body (``type``, ``title``, ``status``, ``detail``, plus ``code`` and extras) that main.py
sends as problem+json, for these errors and for the framework's own."""

import contextlib
import os
import re
import tempfile
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# Characters that end a path in running text, and what may follow a directory in a path.
_PATH_END = r"""\s'"`<>|"""
_PATH_TAIL = rf"(?:[/\\][^{_PATH_END}]*)?"
_TRAILING_PUNCTUATION = ".,:;!?)]}"


@lru_cache(maxsize=8)
def _owned_path_pattern(prefixes: tuple[str, ...]) -> re.Pattern[str]:
    """Any absolute path at or under one of ``prefixes`` (longest first), as a whole word."""
    alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    # Not inside a longer word, relative path or URL ("https://host/tmp/x", "a/tmp"), though
    # after a scheme's slashes ("sqlite:////root/.distill/distill.db"); not a sibling directory
    # that merely starts the same ("/tmpfoo" for "/tmp").
    return re.compile(rf"(?<![\w.\\-])(?:{alternatives})(?![^/\\{_PATH_END}]){_PATH_TAIL}")


def _owned_directories() -> tuple[str, ...]:
    """The absolute directories whose paths are the server's own: its home (and the storage and
    data directories), the temp dir, the working directory. Never raises."""
    directories: list[Path] = []
    # Unreadable settings (or a deleted working directory) must not break rendering an error.
    with contextlib.suppress(Exception):
        from app.config import get_settings  # lazily: config must stay free to import errors

        settings = get_settings()
        directories += [settings.home, settings.resolved_storage_dir, settings.resolved_data_dir]
    for where in (tempfile.gettempdir, os.getcwd):
        with contextlib.suppress(Exception):
            directories.append(Path(where()))
    found: set[str] = set()
    for directory in directories:
        try:
            forms = {directory.absolute(), directory.resolve()}
        except Exception:
            continue
        # "/" or a bare drive would match every absolute path: never a prefix.
        found.update(str(f) for f in forms if len(f.parts) > 1)
    return tuple(sorted(found))


def _file_name(match: re.Match[str]) -> str:
    path = match.group(0)
    stripped = path.rstrip(_TRAILING_PUNCTUATION)
    name = next((part for part in reversed(re.split(r"[/\\]", stripped)) if part), stripped)
    return name + path[len(stripped) :]


def redact_paths(value: Any, prefixes: tuple[str, ...] | None = None) -> Any:
    """``value`` with every path under the server's own directories cut to its file name
    (``/root/.distill/staging/3f2a`` becomes ``3f2a``), in strings and inside lists and dicts."""
    if prefixes is None:
        prefixes = _owned_directories()
    if not prefixes:
        return value
    if isinstance(value, str):
        return _owned_path_pattern(prefixes).sub(_file_name, value)
    if isinstance(value, list):
        return [redact_paths(v, prefixes) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_paths(v, prefixes) for v in value)
    if isinstance(value, dict):
        return {k: redact_paths(v, prefixes) for k, v in value.items()}
    return value


def problem(
    status: int, code: str, detail: str, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The RFC 9457 body of every error; ``title`` defaults to the HTTP status phrase. No path
    under the server's own directories leaves in ``detail`` or the extras: only its file name."""
    prefixes = _owned_directories()
    return {
        "type": f"https://distill.dev/problems/{code}",
        "title": HTTPStatus(status).phrase if title is None else title,
        "status": status,
        "detail": redact_paths(detail, prefixes),
        "code": code,
        **{key: redact_paths(value, prefixes) for key, value in extra.items()},
    }


class AppError(Exception):
    """``code`` is the class's unless one is given: a family of refusals (a preflight's, say)
    shares a status and title while each keeps its own code."""

    status: ClassVar[int] = 400
    code: str = "bad_request"
    title: ClassVar[str] = "Bad request"
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers = dict(self.default_headers)
        if code is not None:
            self.code = code

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.code, self.detail, self.title, **self.extra)


class NotFound(AppError):
    status, code, title = 404, "not_found", "Not found"


class Unauthorized(AppError):
    """No key, or one that is unknown, expired or revoked (RFC 6750's ``invalid_token``)."""

    status, code, title = 401, "unauthorized", "Unauthorized"
    default_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="distill"'}


class InvalidKey(Unauthorized):
    code = "invalid_key"
    default_headers: ClassVar[dict[str, str]] = {
        "WWW-Authenticate": 'Bearer realm="distill", error="invalid_token"'
    }


class Forbidden(AppError):
    status, code, title = 403, "forbidden", "Forbidden"


class Conflict(AppError):
    status, code, title = 409, "conflict", "Conflict"


class JobNotReady(Conflict):
    code, title = "job_not_ready", "Job has not succeeded"


class ArtifactsExpired(AppError):
    """The job's student files were removed by the retention setting; the job itself stays."""

    status, code, title = 410, "artifacts_expired", "Student removed"


class InvalidInput(AppError):
    status, code, title = 422, "invalid_input", "Invalid input"


class InvalidSpec(InvalidInput):
    code, title = "invalid_spec", "Invalid job specification"


class InvalidModel(InvalidInput):
    code, title = "invalid_model", "Invalid model file"


class InvalidDataset(InvalidInput):
    code, title = "invalid_dataset", "Invalid dataset file"


class LabelsNotZeroBased(InvalidDataset):
    code, title = "labels_not_zero_based", "Labels do not start at 0"


class PreflightFailed(InvalidInput):
    """The teacher, run on a sample of the data, shows the student would be meaningless; each
    cause has its own ``code`` (``teacher_non_finite``, ``teacher_below_chance``...)."""

    code, title = "preflight_failed", "The teacher and the data do not fit"


class DatasetUnavailable(InvalidInput):
    code, title = "dataset_unavailable", "Dataset not available"


class UnsupportedFormat(AppError):
    status, code, title = 415, "unsupported_format", "Unsupported file format"


class PickleRefused(UnsupportedFormat):
    code, title = "pickle_refused", "Pickle files are refused"


class BrokerUnavailable(AppError):
    status, code, title = 503, "broker_unavailable", "Broker unavailable"


class PayloadTooLarge(AppError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class QuotaExceeded(AppError):
    """A tenant's quota (``DISTILL_QUOTA_*``) is used up: the problem names it (``quota``) and
    its ``limit``; the answer carries Retry-After (and any ``headers`` given)."""

    status, code, title = 429, "quota_exceeded", "Quota exceeded"

    def __init__(
        self,
        detail: str,
        *,
        code: str,
        quota: str,
        limit: int,
        retry_after_s: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail, code=code, quota=quota, limit=limit)
        self.headers.update({"Retry-After": str(retry_after_s), **(headers or {})})


class InsufficientStorage(AppError):
    """RFC 4918's 507: the tenant's storage quota cannot hold what was sent."""

    status, code, title = 507, "storage_quota", "Storage quota exceeded"


# What a database text column cannot hold: NUL (PostgreSQL text) and lone surrogates (not UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_character(text: str) -> str | None:
    """The first character of ``text`` no database text column can hold, as ``U+XXXX``."""
    match = _UNSTORABLE.search(text)
    return None if match is None else f"U+{ord(match.group()):04X}"


def find_unstorable(value: Any, field: str) -> tuple[str, str] | None:
    """The first string (key or value) in a JSON-like ``value`` holding a character no database
    text column can hold: its dotted path from ``field`` (``teachers.0.id``; such characters in
    keys shown as U+FFFD) and the character. Iterative: any depth the JSON parser took is walked.
    """
    pending: list[tuple[str, Any]] = [(field, value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            character = unstorable_character(item)
            if character is not None:
                return _UNSTORABLE.sub("\ufffd", path), character
        elif isinstance(item, dict | list | tuple):
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in reversed(list(children)):
                child_path = f"{path}.{key}" if path else str(key)
                pending += [(child_path, child), (child_path, str(key))]
    return None


class Problem(BaseModel):
    """An error, as RFC 9457 problem+json (`application/problem+json`); some carry more fields
    (`limit_bytes`, `job_status`...)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="A URI naming the kind of problem, ending in its `code`.")
    title: str
    status: int
    detail: str = Field(description="What went wrong, for a person.")
    code: str = Field(description="What went wrong, for a program (`not_found`, ...).")
    field: str | None = Field(
        default=None, description="The input at fault, as a dotted path (`teachers.0.id`)."
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="`validation_error`: every error found (`loc`, `msg`, `type`)."
    )


PROBLEM_JSON = "application/problem+json"
PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: each status answered with a problem+json body (the
    app's OpenAPI document holds the ``Problem`` schema)."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
        }
        for status in statuses
    }
