import json
from collections.abc import Iterable

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.ml.signature import OutputKind, Preprocessing
from app.ml.teacher_formats import TeacherDeclarations, inspect_teacher
from app.models import TERMINAL_STATUSES, Job, JobTeacher, Teacher
from app.storage import ArtifactStore, StoredFile, keys, remove_on_rollback

CLASS_NAMES = TypeAdapter(list[str])
PREPROCESSING: TypeAdapter[Preprocessing] = TypeAdapter(Preprocessing)


def _json_field(adapter: TypeAdapter[object], text: str | None, field: str) -> object:
    if text is None:
        return None
    try:
        return adapter.validate_python(json.loads(text))
    except (ValueError, ValidationError, RecursionError) as e:  # RecursionError: deep nesting
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
    """Inspect the staged upload, then keep it. The staged file is removed if this fails for
    any reason, and the kept one if the request's transaction rolls back."""
    with store.holding(upload):
        info = inspect_teacher(upload.path, filename, config, declared)
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
        remove_on_rollback(session, store, keys.teacher_dir(teacher.id))
        store.adopt(upload.path, teacher.storage_key)
    return teacher


def get_teacher(session: Session, teacher_id: str) -> Teacher:
    teacher = session.get(Teacher, teacher_id)
    if teacher is None:
        raise NotFound(f"No teacher with id {teacher_id}.")
    return teacher


def list_teachers(session: Session) -> list[Teacher]:
    return list(session.scalars(select(Teacher).order_by(Teacher.created_at.desc())))


def lock_teachers(session: Session, teacher_ids: Iterable[str], *, exclusive: bool) -> set[str]:
    """Lock these teachers' rows until the transaction ends; returns the ids that still exist.

    Submitting a job takes a shared lock, deleting an exclusive one: whichever comes second waits
    for the other's commit, then sees it (the job, or the teacher's absence). On PostgreSQL these
    are row locks (``FOR KEY SHARE``: submissions do not wait for one another; ``FOR UPDATE``);
    SQLite has one writer at a time, so both take its write lock, with a write that changes
    nothing, and hold it to the commit.
    """
    ids = sorted(set(teacher_ids))
    query = select(Teacher.id).where(Teacher.id.in_(ids))
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Teacher)
            .where(Teacher.id.in_(ids))
            .values(name=Teacher.name)
            .execution_options(synchronize_session=False)
        )
    else:
        query = query.with_for_update(read=not exclusive, key_share=not exclusive)
    return set(session.scalars(query))


def delete_teacher(session: Session, *, store: ArtifactStore, teacher_id: str) -> None:
    """Delete a teacher that no unfinished job uses (409 otherwise), with its files once the
    deletion commits. Locked against job submission (``lock_teachers``)."""
    if teacher_id not in lock_teachers(session, [teacher_id], exclusive=True):
        raise NotFound(f"No teacher with id {teacher_id}.")
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
