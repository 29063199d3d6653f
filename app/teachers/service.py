import json

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.ml.signature import OutputKind, Preprocessing
from app.ml.teacher_formats import TeacherDeclarations, inspect_teacher
from app.models import TERMINAL_STATUSES, Job, JobTeacher, Teacher
from app.storage import ArtifactStore, StoredFile, keys

CLASS_NAMES = TypeAdapter(list[str])
PREPROCESSING: TypeAdapter[Preprocessing] = TypeAdapter(Preprocessing)


def _json_field(adapter: TypeAdapter[object], text: str | None, field: str) -> object:
    if text is None:
        return None
    try:
        return adapter.validate_python(json.loads(text))
    except (ValueError, ValidationError) as e:
        errors = e.errors(include_url=False) if isinstance(e, ValidationError) else None
        raise InvalidInput(
            f"`{field}` is not valid JSON of the expected form"
            + (f": {errors[0]['msg']} at {errors[0]['loc']}." if errors else "."),
            field=field,
        ) from e


def declarations(
    *,
    output: str | None,
    output_kind: OutputKind | None,
    classes: str | None,
    preprocessing: str | None,
) -> TeacherDeclarations:
    """The upload's form fields as declarations (checked before the file is received).

    Raises:
        InvalidInput: `classes` or `preprocessing` is not JSON of the right form (422).
    """
    return TeacherDeclarations(
        output=output,
        output_kind=output_kind,
        classes=_json_field(CLASS_NAMES, classes, "classes"),  # type: ignore[arg-type]
        preprocessing=_json_field(PREPROCESSING, preprocessing, "preprocessing"),  # type: ignore[arg-type]
    )


def create_teacher(
    session: Session,
    *,
    store: ArtifactStore,
    upload: StoredFile,
    filename: str,
    name: str | None,
    config: str | None,
    declared: TeacherDeclarations,
) -> Teacher:
    """Inspect the staged upload, then keep it; the staged file is removed on any refusal."""
    try:
        info = inspect_teacher(upload.path, filename, config, declared)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    teacher = Teacher(
        name=(name or filename)[:255],
        format=info.format,
        sha256=upload.sha256,
        size_bytes=upload.size_bytes,
        parameter_count=info.parameter_count,
        signature=info.signature.model_dump(mode="json"),
        architecture=info.architecture,
        feature_layers=[layer.model_dump() for layer in info.feature_layers],
        scores_choice=info.scores_choice.model_dump(),
        storage_key="",
    )
    session.add(teacher)
    session.flush()
    teacher.storage_key = keys.teacher(teacher.id, info.format)
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
    active = session.scalar(
        select(JobTeacher.job_id)
        .join(Job, Job.id == JobTeacher.job_id)
        .where(JobTeacher.teacher_id == teacher_id, Job.status.not_in(TERMINAL_STATUSES))
        .limit(1)
    )
    if active is not None:
        raise Conflict(f"Teacher {teacher_id} is used by job {active}, which has not finished.")
    session.delete(teacher)
    session.flush()
    # The files go only once the row's deletion is committed: a failed commit keeps both.
    folder = keys.teacher_dir(teacher_id)
    event.listen(session, "after_commit", lambda _: store.delete_tree(folder), once=True)
