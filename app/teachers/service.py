import fnmatch
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import lock_rows
from app.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from app.ml.archives import zip_files
from app.ml.signature import OutputKind, Preprocessing
from app.ml.teacher_formats import TeacherDeclarations, inspect_teacher
from app.ml.teacher_formats.huggingface import DISTILL_KEY
from app.models import TERMINAL_STATUSES, Job, JobTeacher, Teacher
from app.quotas import check_storage
from app.storage import ArtifactStore, StoredFile, keys, remove_on_rollback, sha256_file

CLASS_NAMES = TypeAdapter(list[str])
PREPROCESSING: TypeAdapter[Preprocessing] = TypeAdapter(Preprocessing)
# `hf:<owner>/<name>@<revision>`: a model on the Hugging Face Hub, at a branch, tag or commit
# (default `main`). No `..` anywhere: the revision also names files in the local cache.
HUB_REFERENCE = re.compile(
    r"hf:(?P<repo_id>(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95})"
    r"(?:@(?P<revision>[\w-][\w.-]{0,99}(?:/[\w-][\w.-]{0,99}){0,3}))?",
    re.ASCII,
)
# What is fetched from a Hub repository: configs, safetensors weights and tokenizer files only
# (never pickles, nor code).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


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
    tenant_id: str,
    store: ArtifactStore,
    upload: StoredFile,
    filename: str,
    name: str | None,
    config: str | None,
    declared: TeacherDeclarations,
    source: dict[str, Any] | None = None,
) -> Teacher:
    """Inspect the staged upload, then keep it. The staged file is removed if this fails for
    any reason, and the kept one if the request's transaction rolls back. ``source``: where a
    fetched teacher came from, recorded in its architecture (``distill.hub``)."""
    with store.holding(upload):
        check_storage(session, store, tenant_id, upload.size_bytes, get_settings())
        info = inspect_teacher(upload.path, filename, config, declared)
        architecture = info.architecture
        if source is not None and architecture is not None:
            architecture = {
                **architecture,
                DISTILL_KEY: {**architecture.get(DISTILL_KEY, {}), "hub": source},
            }
        teacher = Teacher(
            tenant_id=tenant_id,
            name=(name or filename)[:255],
            format=info.format,
            sha256=upload.sha256,
            size_bytes=upload.size_bytes,
            parameter_count=info.parameter_count,
            signature=info.signature.model_dump(mode="json"),
            architecture=architecture,
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


def parse_hub_reference(reference: str) -> tuple[str, str]:
    """``hf:<repo_id>@<revision>`` -> (repo id, revision; ``main`` when none is given).

    Raises:
        InvalidInput: not a reference of that form (422 on `reference`).
    """
    match = HUB_REFERENCE.fullmatch(reference)
    if match is None or ".." in reference:
        raise InvalidInput(
            "`reference` must be `hf:<owner>/<name>@<revision>`, a Hugging Face Hub model at "
            "a branch, tag or commit (e.g. `hf:distilbert/distilbert-base-uncased-finetuned-sst-2"
            "-english@main`).",
            field="reference",
        )
    return match["repo_id"], match["revision"] or "main"


def _hub_snapshot(repo_id: str, revision: str, max_bytes: int) -> Path:
    """The repository's configs, safetensors and tokenizer files at ``revision``, fetched into
    the Hugging Face cache (``HF_HUB_CACHE``) unless already there (``HF_HUB_OFFLINE=1``: only
    from there). Online, the files' sizes are checked first and the revision pinned to the
    commit they belong to.

    Raises:
        PayloadTooLarge: more than ``max_bytes`` to fetch (413).
        InvalidInput: the repository, revision or files cannot be had (422 on `reference`).
    """
    from huggingface_hub import is_offline_mode, snapshot_download

    try:
        if not is_offline_mode():
            plan = snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_FILES, dry_run=True
            )
            size = sum(f.file_size or 0 for f in plan)
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"`{repo_id}` at `{revision}` holds {size} bytes of model files, more than "
                    f"the limit of {max_bytes} bytes.",
                    limit_bytes=max_bytes,
                )
            revision = plan[0].commit_hash if plan else revision
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as e:  # huggingface_hub's errors are one or the other
        raise InvalidInput(
            f"`{repo_id}` at `{revision}` cannot be fetched from the Hugging Face Hub "
            f"({type(e).__name__}): check the repository and revision (private and gated "
            "repositories are not supported).",
            code="reference_unavailable",
            field="reference",
        ) from e


def create_teacher_from_reference(
    session: Session,
    *,
    tenant_id: str,
    store: ArtifactStore,
    reference: str,
    max_bytes: int,
    name: str | None,
    config: str | None,
    declared: TeacherDeclarations,
) -> Teacher:
    """Fetch a Hugging Face Hub model (``hf:<repo_id>@<revision>``: safetensors only), zip it
    into staging and keep it as an uploaded archive would be kept (``create_teacher``), with
    its repository, revision, commit and each file's sha256 in its architecture.

    Raises:
        InvalidInput: a malformed or unavailable reference (422).
        PayloadTooLarge: a model over ``max_bytes`` (413).
        (and whatever ``create_teacher`` raises for the model itself)
    """
    repo_id, revision = parse_hub_reference(reference)
    snapshot = _hub_snapshot(repo_id, revision, max_bytes)
    commit = snapshot.name  # the cache keeps each snapshot in a folder named by its commit
    # The cached snapshot may hold more than was fetched now (a pickle, code): only these go,
    # matched as huggingface_hub matches `allow_patterns`.
    names = sorted(
        name
        for name in (p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        if any(fnmatch.fnmatch(name, pattern) for pattern in HUB_FILES)
    )
    files = {name: sha256_file(snapshot / name) for name in names}
    store.staging.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=store.staging, suffix=".zip", delete=False) as staged:
        path = Path(staged.name)
    try:
        zip_files(snapshot, list(files), path)
        size = path.stat().st_size
        if size > max_bytes:
            raise PayloadTooLarge(
                f"`{reference}` zips to {size} bytes, more than the limit of {max_bytes} bytes.",
                limit_bytes=max_bytes,
            )
        upload = StoredFile(path, sha256_file(path), size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    source = {"repo_id": repo_id, "revision": revision, "commit": commit, "files": files}
    return create_teacher(
        session,
        tenant_id=tenant_id,
        store=store,
        upload=upload,
        filename=f"{repo_id}@{commit}",
        name=name or reference,
        config=config,
        declared=declared,
        source=source,
    )


def get_teacher(session: Session, tenant_id: str, teacher_id: str) -> Teacher:
    """The tenant's teacher. Raises NotFound, also for another tenant's."""
    teacher = session.get(Teacher, teacher_id)
    if teacher is None or teacher.tenant_id != tenant_id:
        raise NotFound(f"No teacher with id {teacher_id}.")
    return teacher


def list_teachers(session: Session, tenant_id: str) -> list[Teacher]:
    query = select(Teacher).where(Teacher.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(Teacher.created_at.desc())))


def delete_teacher(
    session: Session, *, tenant_id: str, store: ArtifactStore, teacher_id: str
) -> None:
    """Delete a teacher that no unfinished job uses (409 otherwise), with its files once the
    deletion commits. Locked against job submission (``lock_rows``)."""
    if teacher_id not in lock_rows(session, Teacher, [teacher_id], exclusive=True):
        raise NotFound(f"No teacher with id {teacher_id}.")
    teacher = get_teacher(session, tenant_id, teacher_id)
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
    store.delete_after_commit(session, keys.teacher_dir(teacher_id))
