"""A typed Python client of the Distill REST API, on httpx: ``DistillClient`` (sync) and
``AsyncDistillClient`` (asyncio), with the same methods. Responses are the API's own pydantic
schemas; an error response raises ``DistillError`` with its RFC 9457 problem (``status``,
``code``, ``detail``, ``field``). ``events`` follows a job's server-sent events and reconnects with
``Last-Event-ID`` when the connection drops, so no event is lost or repeated. A server that
requires API keys gets ``api_key`` (default: ``$DISTILL_API_KEY``) as ``Authorization: Bearer``
on every request, event streams and downloads included.

    with DistillClient("http://127.0.0.1:8000", api_key="dsk_...") as distill:
        teacher = distill.upload_teacher("teacher.onnx")
        job = distill.submit_job({"teacher": teacher.id, "dataset": "builtin:digits",
                                  "student": {"architecture": "mlp", "hidden_sizes": [32]}})
        for event in distill.events(job.id):
            print(event.event, event.data)
        distill.download_artifact(job.id, "student.onnx")
"""

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from app.datasets.schemas import DatasetList, DatasetOut
from app.jobs.schemas import DistillationSpec, JobOut, JobPage, MetricList, MetricOut
from app.ml.signature import OutputKind
from app.models import ArtifactFormat, JobStatus
from app.serving.schemas import PredictResponse
from app.teachers.schemas import TeacherList, TeacherOut

DEFAULT_URL = "http://127.0.0.1:8000"
# Uploads and a first preflight can take a while; a stream waits past the server's 15 s pings.
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
# Before the server's first `retry:` arrives, and the most reconnections in a row without an event.
RETRY_S = 2.0
RECONNECT_TRIES = 5


def default_url() -> str:
    """The server address: ``DISTILL_URL`` if set, else the one ``distill up`` listens on."""
    return os.environ.get("DISTILL_URL", DEFAULT_URL)


def _auth_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``api_key`` (``$DISTILL_API_KEY`` when None); none
    without a key."""
    key = os.environ.get("DISTILL_API_KEY") if api_key is None else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def _idempotency_headers(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` header for ``key``: the same key sent again (a retry) gets the
    first success's answer again instead of doing the work twice."""
    return {} if key is None else {"Idempotency-Key": key}


class DistillError(Exception):
    """An error answer of the API: its HTTP ``status`` and the problem's ``code``, ``detail``
    and ``field`` (the input to blame, when one is); ``problem`` is the whole body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None,
        problem: dict[str, Any],
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{detail} ({status} {code})")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.problem = problem
        self.retry_after_s = retry_after_s  # a 429's (or 503's) Retry-After, in seconds

    @classmethod
    def from_response(cls, response: httpx.Response) -> "DistillError":
        """The error a (read) error response stands for; a body that is no problem+json (a
        proxy's page, say) keeps its text as the detail."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"detail": response.text or response.reason_phrase}
        field = body.get("field")
        retry_after = response.headers.get("retry-after", "")
        return cls(
            status=response.status_code,
            code=str(body.get("code", f"http_{response.status_code}")),
            detail=str(body.get("detail", response.reason_phrase)),
            field=None if field is None else str(field),
            problem=body,
            retry_after_s=float(retry_after) if retry_after.isdigit() else None,
        )


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: ``event`` is ``status``, ``preflight``, ``metrics``,
    ``progress``, ``result``, ``error`` or ``end`` (others may come); ``data`` its JSON."""

    id: str
    event: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Artifact:
    """A downloaded file of a job's student, its sha256 checked against the server's."""

    path: Path
    sha256: str
    size_bytes: int


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        response.read()
        raise DistillError.from_response(response)
    return response


def _teacher_form(
    *,
    name: str | None,
    config: Mapping[str, Any] | None,
    output: str | None,
    output_kind: OutputKind | None,
    classes: Sequence[str] | None,
    preprocessing: Mapping[str, Any] | None,
) -> dict[str, str]:
    form = {
        "name": name,
        "config": None if config is None else json.dumps(config),
        "output": output,
        "output_kind": None if output_kind is None else output_kind.value,
        "classes": None if classes is None else json.dumps(list(classes)),
        "preprocessing": None if preprocessing is None else json.dumps(preprocessing),
    }
    return {key: value for key, value in form.items() if value is not None}


def _dataset_form(
    *,
    name: str | None,
    classes: Sequence[str] | None,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
) -> dict[str, str]:
    form = {
        "name": name,
        "classes": None if classes is None else json.dumps(list(classes)),
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
    }
    return {key: value for key, value in form.items() if value is not None}


def _spec_body(spec: DistillationSpec | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, DistillationSpec):
        return spec.model_dump(mode="json", exclude_none=True)
    return dict(spec)


def _jobs_query(limit: int, offset: int, status: JobStatus | None) -> dict[str, str | int]:
    query: dict[str, str | int] = {"limit": limit, "offset": offset}
    if status is not None:
        query["status"] = status.value
    return query


def _event(sse: ServerSentEvent) -> Event:
    return Event(id=sse.id, event=sse.event, data=json.loads(sse.data) if sse.data else {})


def _download_target(response: httpx.Response, destination: Path | None) -> Path:
    """``destination``, or the server's file name in it when it is a directory (default: the
    working directory)."""
    if destination is not None and not destination.is_dir():
        return destination
    header = Message()
    header["content-disposition"] = response.headers.get("content-disposition", "")
    # Only a name: a header naming a path must not write outside the directory.
    name = Path(header.get_filename() or "artifact").name
    return (destination or Path.cwd()) / name


class _Download:
    """A streamed download into ``<target>.part``, renamed only once its sha256 matches."""

    def __init__(self, response: httpx.Response, destination: Path | None) -> None:
        self.target = _download_target(response, destination)
        self.expected = response.headers.get("x-content-sha256")
        self.partial = self.target.with_name(self.target.name + ".part")
        self.digest = hashlib.sha256()
        self.size = 0
        self.file = self.partial.open("wb")

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        self.file.write(chunk)

    def finish(self, response: httpx.Response) -> Artifact:
        self.file.close()
        sha256 = self.digest.hexdigest()
        if self.expected is not None and sha256 != self.expected:
            self.partial.unlink()
            raise DistillError(
                response.status_code,
                "sha256_mismatch",
                f"The download's sha256 {sha256} is not the server's {self.expected}.",
                None,
                {},
            )
        self.partial.replace(self.target)
        return Artifact(self.target, sha256, self.size)

    def abandon(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


class DistillClient:
    """The Distill API over one ``httpx.Client`` (connection pool), authenticated by ``api_key``
    (default: ``$DISTILL_API_KEY``) when there is one; close it, or use ``with``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: httpx.Timeout | float = TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url or default_url()
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            headers=_auth_headers(api_key),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return _checked(self._http.request(method, path, **kwargs))

    def ready(self) -> bool:
        """Whether the API answers and reaches its database (``/readyz``)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def upload_teacher(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        output: str | None = None,
        output_kind: OutputKind | None = None,
        classes: Sequence[str] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> TeacherOut:
        """Upload a teacher file: ONNX, safetensors with its ``config``, or a Hugging Face
        ``save_pretrained`` archive; ``idempotency_key`` makes a retry safe."""
        form = _teacher_form(
            name=name,
            config=config,
            output=output,
            output_kind=output_kind,
            classes=classes,
            preprocessing=preprocessing,
        )
        path = Path(path)
        with path.open("rb") as file:
            response = self._request(
                "POST",
                "/v1/teachers",
                files={"file": (path.name, file)},
                data=form,
                headers=_idempotency_headers(idempotency_key),
            )
        return TeacherOut.model_validate(response.json())

    def list_teachers(self) -> list[TeacherOut]:
        """The uploaded teachers, newest first."""
        return TeacherList.model_validate(self._request("GET", "/v1/teachers").json()).items

    def get_teacher(self, teacher_id: str) -> TeacherOut:
        """One teacher."""
        return TeacherOut.model_validate(self._request("GET", f"/v1/teachers/{teacher_id}").json())

    def delete_teacher(self, teacher_id: str) -> None:
        """Delete a teacher no unfinished job uses."""
        self._request("DELETE", f"/v1/teachers/{teacher_id}")

    def upload_dataset(
        self,
        path: str | Path,
        *,
        test_file: str | Path | None = None,
        name: str | None = None,
        classes: Sequence[str] | None = None,
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | None = None,
        idempotency_key: str | None = None,
    ) -> DatasetOut:
        """Upload a dataset: ``.npz`` arrays, or text records (CSV, TSV, JSONL, Parquet) with an
        optional ``test_file``; ``idempotency_key`` makes a retry safe."""
        form = _dataset_form(
            name=name,
            classes=classes,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
        )
        paths = {"file": Path(path)} | ({} if test_file is None else {"test_file": Path(test_file)})
        files = {key: (p.name, p.open("rb")) for key, p in paths.items()}
        try:
            response = self._request(
                "POST",
                "/v1/datasets",
                files=files,
                data=form,
                headers=_idempotency_headers(idempotency_key),
            )
        finally:
            for _, file in files.values():
                file.close()
        return DatasetOut.model_validate(response.json())

    def list_datasets(self) -> list[DatasetOut]:
        """The builtin datasets and the uploaded ones."""
        return DatasetList.model_validate(self._request("GET", "/v1/datasets").json()).items

    def get_dataset(self, ref: str) -> DatasetOut:
        """One dataset: ``builtin:<name>`` or an uploaded one's id."""
        return DatasetOut.model_validate(self._request("GET", f"/v1/datasets/{ref}").json())

    def submit_job(
        self, spec: DistillationSpec | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> JobOut:
        """Submit a distillation job (validated by the server, preflight included);
        ``idempotency_key`` makes a retry safe: it answers the first submission again."""
        response = self._request(
            "POST",
            "/v1/jobs",
            json=_spec_body(spec),
            headers=_idempotency_headers(idempotency_key),
        )
        return JobOut.model_validate(response.json())

    def list_jobs(
        self, *, limit: int = 50, offset: int = 0, status: JobStatus | None = None
    ) -> JobPage:
        """A page of jobs, newest first, optionally of one status."""
        query = _jobs_query(limit, offset, status)
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=query).json())

    def get_job(self, job_id: str) -> JobOut:
        """A job: status, phase, progress, latest metrics, and its result or error."""
        return JobOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel_job(self, job_id: str) -> JobOut:
        """Cancel a job: at once if queued, at the worker's next check if running."""
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def job_metrics(self, job_id: str) -> list[MetricOut]:
        """The job's metrics, one row per epoch."""
        response = self._request("GET", f"/v1/jobs/{job_id}/metrics")
        return MetricList.model_validate(response.json()).items

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events until its ``end`` (included); after ``last_event_id`` if given.
        A dropped connection is resumed from the last event received."""
        failures = 0
        retry_s = RETRY_S
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
            try:
                with connect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers
                ) as source:
                    if source.response.status_code == 204:  # `end` was the last event seen
                        return
                    _checked(source.response)
                    for sse in source.iter_sse():
                        failures = 0
                        retry_s = RETRY_S if sse.retry is None else sse.retry / 1000
                        last_event_id = sse.id or last_event_id
                        event = _event(sse)
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError:
                failures += 1
                if failures > RECONNECT_TRIES:
                    raise
            time.sleep(retry_s)

    def download_artifact(
        self,
        job_id: str,
        destination: str | Path | None = None,
        *,
        format: ArtifactFormat = ArtifactFormat.ONNX,
    ) -> Artifact:
        """Download the student (or its manifest, ...) to ``destination`` (a file, or a directory
        to put the server's file name in; default the working directory), checking its sha256."""
        target = None if destination is None else Path(destination)
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/artifact", params={"format": format.value}
        ) as response:
            _checked(response)
            download = _Download(response, target)
            try:
                for chunk in response.iter_bytes():
                    download.write(chunk)
            except BaseException:
                download.abandon()
                raise
            return download.finish(response)

    def predict(self, job_id: str, inputs: Sequence[Any]) -> PredictResponse:
        """Classify a batch with the job's student (samples as the dataset stores them; text as
        strings or ``[text, text_pair]`` lists)."""
        response = self._request("POST", f"/v1/jobs/{job_id}/predict", json={"inputs": inputs})
        return PredictResponse.model_validate(response.json())


class AsyncDistillClient:
    """``DistillClient`` for asyncio, over one ``httpx.AsyncClient``; ``aclose`` it, or use
    ``async with``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: httpx.Timeout | float = TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url or default_url()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            headers=_auth_headers(api_key),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return _checked(await self._http.request(method, path, **kwargs))

    async def ready(self) -> bool:
        """Whether the API answers and reaches its database (``/readyz``)."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def upload_teacher(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        output: str | None = None,
        output_kind: OutputKind | None = None,
        classes: Sequence[str] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> TeacherOut:
        """Upload a teacher file: ONNX, safetensors with its ``config``, or a Hugging Face
        ``save_pretrained`` archive; ``idempotency_key`` makes a retry safe."""
        form = _teacher_form(
            name=name,
            config=config,
            output=output,
            output_kind=output_kind,
            classes=classes,
            preprocessing=preprocessing,
        )
        path = Path(path)
        with path.open("rb") as file:
            response = await self._request(
                "POST",
                "/v1/teachers",
                files={"file": (path.name, file)},
                data=form,
                headers=_idempotency_headers(idempotency_key),
            )
        return TeacherOut.model_validate(response.json())

    async def list_teachers(self) -> list[TeacherOut]:
        """The uploaded teachers, newest first."""
        response = await self._request("GET", "/v1/teachers")
        return TeacherList.model_validate(response.json()).items

    async def get_teacher(self, teacher_id: str) -> TeacherOut:
        """One teacher."""
        response = await self._request("GET", f"/v1/teachers/{teacher_id}")
        return TeacherOut.model_validate(response.json())

    async def delete_teacher(self, teacher_id: str) -> None:
        """Delete a teacher no unfinished job uses."""
        await self._request("DELETE", f"/v1/teachers/{teacher_id}")

    async def upload_dataset(
        self,
        path: str | Path,
        *,
        test_file: str | Path | None = None,
        name: str | None = None,
        classes: Sequence[str] | None = None,
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | None = None,
        idempotency_key: str | None = None,
    ) -> DatasetOut:
        """Upload a dataset: ``.npz`` arrays, or text records (CSV, TSV, JSONL, Parquet) with an
        optional ``test_file``; ``idempotency_key`` makes a retry safe."""
        form = _dataset_form(
            name=name,
            classes=classes,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
        )
        paths = {"file": Path(path)} | ({} if test_file is None else {"test_file": Path(test_file)})
        files = {key: (p.name, p.open("rb")) for key, p in paths.items()}
        try:
            response = await self._request(
                "POST",
                "/v1/datasets",
                files=files,
                data=form,
                headers=_idempotency_headers(idempotency_key),
            )
        finally:
            for _, file in files.values():
                file.close()
        return DatasetOut.model_validate(response.json())

    async def list_datasets(self) -> list[DatasetOut]:
        """The builtin datasets and the uploaded ones."""
        response = await self._request("GET", "/v1/datasets")
        return DatasetList.model_validate(response.json()).items

    async def get_dataset(self, ref: str) -> DatasetOut:
        """One dataset: ``builtin:<name>`` or an uploaded one's id."""
        response = await self._request("GET", f"/v1/datasets/{ref}")
        return DatasetOut.model_validate(response.json())

    async def submit_job(
        self, spec: DistillationSpec | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> JobOut:
        """Submit a distillation job (validated by the server, preflight included);
        ``idempotency_key`` makes a retry safe: it answers the first submission again."""
        response = await self._request(
            "POST",
            "/v1/jobs",
            json=_spec_body(spec),
            headers=_idempotency_headers(idempotency_key),
        )
        return JobOut.model_validate(response.json())

    async def list_jobs(
        self, *, limit: int = 50, offset: int = 0, status: JobStatus | None = None
    ) -> JobPage:
        """A page of jobs, newest first, optionally of one status."""
        query = _jobs_query(limit, offset, status)
        response = await self._request("GET", "/v1/jobs", params=query)
        return JobPage.model_validate(response.json())

    async def get_job(self, job_id: str) -> JobOut:
        """A job: status, phase, progress, latest metrics, and its result or error."""
        return JobOut.model_validate((await self._request("GET", f"/v1/jobs/{job_id}")).json())

    async def cancel_job(self, job_id: str) -> JobOut:
        """Cancel a job: at once if queued, at the worker's next check if running."""
        response = await self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return JobOut.model_validate(response.json())

    async def job_metrics(self, job_id: str) -> list[MetricOut]:
        """The job's metrics, one row per epoch."""
        response = await self._request("GET", f"/v1/jobs/{job_id}/metrics")
        return MetricList.model_validate(response.json()).items

    async def events(
        self, job_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Event]:
        """The job's events until its ``end`` (included); after ``last_event_id`` if given.
        A dropped connection is resumed from the last event received."""
        failures = 0
        retry_s = RETRY_S
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
            try:
                async with aconnect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers
                ) as source:
                    if source.response.status_code == 204:  # `end` was the last event seen
                        return
                    if source.response.is_error:
                        await source.response.aread()
                        raise DistillError.from_response(source.response)
                    async for sse in source.aiter_sse():
                        failures = 0
                        retry_s = RETRY_S if sse.retry is None else sse.retry / 1000
                        last_event_id = sse.id or last_event_id
                        event = _event(sse)
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError:
                failures += 1
                if failures > RECONNECT_TRIES:
                    raise
            await asyncio.sleep(retry_s)

    async def download_artifact(
        self,
        job_id: str,
        destination: str | Path | None = None,
        *,
        format: ArtifactFormat = ArtifactFormat.ONNX,
    ) -> Artifact:
        """Download the student (or its manifest, ...) to ``destination`` (a file, or a directory
        to put the server's file name in; default the working directory), checking its sha256."""
        target = None if destination is None else Path(destination)
        async with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/artifact", params={"format": format.value}
        ) as response:
            if response.is_error:
                await response.aread()
                raise DistillError.from_response(response)
            download = _Download(response, target)
            try:
                async for chunk in response.aiter_bytes():
                    download.write(chunk)
            except BaseException:
                download.abandon()
                raise
            return download.finish(response)

    async def predict(self, job_id: str, inputs: Sequence[Any]) -> PredictResponse:
        """Classify a batch with the job's student (samples as the dataset stores them; text as
        strings or ``[text, text_pair]`` lists)."""
        response = await self._request(
            "POST", f"/v1/jobs/{job_id}/predict", json={"inputs": inputs}
        )
        return PredictResponse.model_validate(response.json())
