from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import TERMINAL_STATUSES, Job, Teacher
from app.storage import ArtifactStore, StoredFile
from app.teachers.inspection import inspect_teacher


def create_teacher(
    session: Session,
    *,
    store: ArtifactStore,
    upload: StoredFile,
    filename: str,
    name: str | None,
    config: str | None,
) -> Teacher:
    """Inspect the staged upload, then keep it; the staged file is removed on any refusal."""
    try:
        info = inspect_teacher(upload.path, filename, config)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    teacher = Teacher(
        name=(name or filename)[:255],
        format=info.format,
        sha256=upload.sha256,
        size_bytes=upload.size_bytes,
        parameter_count=info.parameter_count,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        input_name=info.input_name,
        output_name=info.output_name,
        architecture=info.architecture,
        feature_layers=[layer.model_dump() for layer in info.feature_layers],
        storage_key="",
    )
    session.add(teacher)
    session.flush()
    teacher.storage_key = f"teachers/{teacher.id}/teacher.{info.format}"
    store.adopt(upload.path, teacher.storage_key)
    return teacher


def get_teacher(session: Session, teacher_id: str) -> Teacher:
    teacher = session.get(Teacher, teacher_id)
    if teacher is None:
        raise NotFound(f"No teacher with id {teacher_id}.")
    return teacher


def list_teachers(session: Session) -> list[Teacher]:
    return list(session.scalars(select(Teacher).order_by(Teacher.created_at.desc())))


def delete_teacher(session: Session, *, store: ArtifactStore, teacher_id: str) -> None:
    teacher = get_teacher(session, teacher_id)
    unfinished = session.scalars(select(Job).where(Job.status.not_in(TERMINAL_STATUSES)))
    active = next(
        (
            job.id
            for job in unfinished
            if teacher_id in {job.teacher_id, *(t["id"] for t in job.spec.get("teachers", []))}
        ),
        None,
    )
    if active is not None:
        raise Conflict(f"Teacher {teacher_id} is used by job {active}, which has not finished.")
    session.delete(teacher)
    session.flush()
    # The files go only once the row's deletion is committed: a failed commit keeps both.
    folder = str(Path(teacher.storage_key).parent)
    event.listen(session, "after_commit", lambda _: store.delete_tree(folder), once=True)
