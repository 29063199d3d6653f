"""Expected errors carry their HTTP status and a machine-readable code. ``problem`` builds the one
RFC 9457 body (``type``, ``title``, ``status``, ``detail``, plus ``code`` and extras) that main.py
sends as problem+json, for these errors and for the framework's own."""

from http import HTTPStatus
from typing import Any, ClassVar


def problem(
    status: int, code: str, detail: str, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The RFC 9457 body of every error; ``title`` defaults to the HTTP status phrase."""
    return {
        "type": f"https://distill.dev/problems/{code}",
        "title": HTTPStatus(status).phrase if title is None else title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


class AppError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.code, self.detail, self.title, **self.extra)


class NotFound(AppError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(AppError):
    status, code, title = 409, "conflict", "Conflict"


class JobNotReady(Conflict):
    code, title = "job_not_ready", "Job has not succeeded"


class InvalidInput(AppError):
    status, code, title = 422, "invalid_input", "Invalid input"


class InvalidSpec(InvalidInput):
    code, title = "invalid_spec", "Invalid job specification"


class InvalidModel(InvalidInput):
    code, title = "invalid_model", "Invalid model file"


class InvalidDataset(InvalidInput):
    code, title = "invalid_dataset", "Invalid dataset file"


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
