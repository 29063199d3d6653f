"""``app.client`` against the API served over HTTP (uvicorn in a thread), on both stacks, with no
worker: uploads, reads, a queued job cancelled, its events replayed and resumed, errors as
``DistillError``; with API keys required, the key on every request (event streams and downloads
too) and the 401s without one or with a revoked one. The CLI's end-to-end tests
(tests/test_cli.py) train through it with a worker."""

import asyncio
import uuid
from pathlib import Path

import pytest

from app.auth import create_key, revoke_key
from app.client import AsyncDistillClient, DistillClient, DistillError
from app.datasets.loading import load_builtin
from app.db import session_scope
from app.jobs.schemas import DistillationSpec
from app.ml.signature import OutputKind
from app.models import JobStatus
from tests.helpers.api import job_body, npz_bytes
from tests.helpers.teachers import TeacherFiles


def test_the_sync_client(url: str, digits_teacher: TeacherFiles, tmp_path: Path) -> None:
    with DistillClient(url) as distill:
        assert distill.ready()
        teacher = distill.upload_teacher(
            digits_teacher.onnx, name="digits", output_kind=OutputKind.LOGITS
        )
        assert teacher.name == "digits" and teacher.num_classes == 10
        assert [t.id for t in distill.list_teachers()] == [teacher.id]
        assert distill.get_teacher(teacher.id).sha256 == teacher.sha256

        data = load_builtin("builtin:digits")
        npz = tmp_path / "digits.npz"
        npz.write_bytes(npz_bytes(x=data.x_train, y=data.y_train, x_test=data.x_test))
        with pytest.raises(DistillError) as refused:
            distill.upload_dataset(npz)  # x_test without y_test
        assert refused.value.status == 422 and refused.value.code != ""
        npz.write_bytes(
            npz_bytes(x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
        )
        dataset = distill.upload_dataset(npz, name="digits again")
        assert dataset.name == "digits again" and dataset.train_size == len(data.x_train)
        assert dataset.ref in {d.ref for d in distill.list_datasets()}
        assert distill.get_dataset("builtin:digits").num_classes == 10

        spec = DistillationSpec.model_validate(job_body(teacher.id, dataset=dataset.ref))
        job = distill.submit_job(spec)
        assert job.status == JobStatus.QUEUED and job.dataset == dataset.ref
        assert distill.list_jobs(status=JobStatus.QUEUED).total == 1
        with pytest.raises(DistillError) as in_use:
            distill.delete_teacher(teacher.id)
        assert in_use.value.status == 409
        with pytest.raises(DistillError) as not_ready:
            distill.download_artifact(job.id, tmp_path)
        assert not_ready.value.code == "job_not_ready" and not list(tmp_path.glob("*.part"))

        assert distill.cancel_job(job.id).status == JobStatus.CANCELLED
        events = list(distill.events(job.id))
        assert events[0].event == "status" and events[-1].event == "end"
        assert events[-1].data == {"status": "cancelled"}
        # Resumed after the last but one event: only the end; after the end: nothing.
        assert list(distill.events(job.id, last_event_id=events[-2].id)) == events[-1:]
        assert list(distill.events(job.id, last_event_id=events[-1].id)) == []
        assert distill.job_metrics(job.id) == []

        with pytest.raises(DistillError) as missing:
            distill.get_job("no-such-job")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        with pytest.raises(DistillError) as missing_events:
            list(distill.events("no-such-job"))
        assert missing_events.value.code == "not_found"
        with pytest.raises(DistillError) as invalid:
            distill.submit_job({"teacher": teacher.id, "dataset": "builtin:digits"})
        assert invalid.value.status == 422 and invalid.value.field is not None


def test_the_async_client(url: str, digits_teacher: TeacherFiles) -> None:
    async def scenario() -> None:
        async with AsyncDistillClient(url) as distill:
            assert await distill.ready()
            teacher = await distill.upload_teacher(digits_teacher.onnx)
            assert [t.id for t in await distill.list_teachers()] == [teacher.id]
            job = await distill.submit_job(job_body(teacher.id))
            assert (await distill.get_job(job.id)).status == JobStatus.QUEUED
            assert (await distill.cancel_job(job.id)).status == JobStatus.CANCELLED
            events = [event async for event in distill.events(job.id)]
            assert events[-1].event == "end" and events[-1].data == {"status": "cancelled"}
            page = await distill.list_jobs(limit=1)
            assert [j.id for j in page.items] == [job.id] and page.total == 1
            with pytest.raises(DistillError) as missing:
                await distill.predict(job.id, [[0.0]])
            assert missing.value.status in (404, 409)
            await distill.delete_teacher(teacher.id)
            assert await distill.list_teachers() == []

    asyncio.run(scenario())


def test_the_clients_send_their_api_key(
    keyed_url: str, digits_teacher: TeacherFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope() as session:
        tenant = f"client-{uuid.uuid4().hex[:8]}"
        _, key = create_key(session, tenant, name="client test")
        _, revoked = create_key(session, tenant)
        revoke_key(session, revoked)

    with DistillClient(keyed_url, api_key=key) as distill:
        teacher = distill.upload_teacher(digits_teacher.onnx)
        assert [t.id for t in distill.list_teachers()] == [teacher.id]
        # The event stream and the download carry the key too: past it, to the missing job.
        with pytest.raises(DistillError) as no_events:
            list(distill.events("no-such-job"))
        assert no_events.value.code == "not_found"
        with pytest.raises(DistillError) as no_artifact:
            distill.download_artifact("no-such-job", tmp_path)
        assert no_artifact.value.code == "not_found"

    # "" sends no key, even with $DISTILL_API_KEY set; None takes $DISTILL_API_KEY.
    monkeypatch.setenv("DISTILL_API_KEY", key)
    with DistillClient(keyed_url, api_key="") as anonymous:
        for refused in (
            anonymous.list_teachers,
            lambda: list(anonymous.events("no-such-job")),
            lambda: anonymous.download_artifact("no-such-job", tmp_path),
        ):
            with pytest.raises(DistillError) as unauthorized:
                refused()
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    with DistillClient(keyed_url) as from_env:
        assert [t.id for t in from_env.list_teachers()] == [teacher.id]
    with DistillClient(keyed_url, api_key=revoked) as distill, pytest.raises(DistillError) as e:
        distill.get_teacher(teacher.id)
    assert (e.value.status, e.value.code) == (401, "key_revoked")

    async def scenario() -> None:
        async with AsyncDistillClient(keyed_url, api_key=key) as distill:
            assert [t.id for t in await distill.list_teachers()] == [teacher.id]
            with pytest.raises(DistillError) as no_events:
                [event async for event in distill.events("no-such-job")]
            assert no_events.value.code == "not_found"
        async with AsyncDistillClient(keyed_url, api_key="") as anonymous:
            with pytest.raises(DistillError) as unauthorized:
                await anonymous.download_artifact("no-such-job", tmp_path)
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
        async with AsyncDistillClient(keyed_url, api_key=f"{revoked}x") as distill:
            with pytest.raises(DistillError) as invalid:
                await distill.list_teachers()
            assert (invalid.value.status, invalid.value.code) == (401, "invalid_key")

    asyncio.run(scenario())
