from typing import Annotated

from fastapi import APIRouter, Form, Response, UploadFile, status

from app.auth import PrincipalDep
from app.dependencies import SessionDep, SettingsDep, StoreDep
from app.errors import InvalidInput, problem_responses
from app.idempotency import IdempotencyDep
from app.ml.signature import OutputKind
from app.teachers import service
from app.teachers.schemas import TeacherList, TeacherOut

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeacherOut,
    responses=problem_responses(409, 413, 415, 507),
)
def upload_teacher(
    principal: PrincipalDep,
    idempotency: IdempotencyDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    file: UploadFile | None = None,
    reference: Annotated[
        str | None,
        Form(
            max_length=512,
            description="Instead of `file`: `hf:<owner>/<name>@<revision>`, a sequence "
            "classifier on the Hugging Face Hub (its safetensors weights, config and tokenizer). "
            "A `file` may also be a zip or tar.gz of a `save_pretrained` directory.",
        ),
    ] = None,
    name: Annotated[str | None, Form(max_length=255)] = None,
    config: Annotated[
        str | None, Form(description="JSON architecture config (safetensors only).")
    ] = None,
    output: Annotated[
        str | None,
        Form(
            max_length=255,
            description="The output holding the class scores, when the model returns several "
            "(default: one named like `logits` or `probabilities`, else the one whose width is "
            "the dataset's class count, else the first).",
        ),
    ] = None,
    output_kind: Annotated[
        OutputKind | None,
        Form(description="What the scores are (default: detected from them by the preflight)."),
    ] = None,
    classes: Annotated[
        str | None, Form(description="JSON list of class names, one per score.")
    ] = None,
    preprocessing: Annotated[
        str | None,
        Form(
            description="JSON: how the teacher's inputs are made from the dataset's records, "
            'e.g. `{"kind": "image", "scale": 0.00392156862745098}` (pixels / 255).'
        ),
    ] = None,
) -> TeacherOut | Response:
    """Upload a teacher: ONNX, safetensors with a `config`, or a Hugging Face model."""
    if idempotency.replay is not None:
        return idempotency.replay
    declared = service.declarations(
        output=output, output_kind=output_kind, classes=classes, preprocessing=preprocessing
    )
    if file is not None and reference is None:
        teacher = service.create_teacher(
            session,
            tenant_id=principal.tenant_id,
            store=store,
            upload=store.receive(file.file, max_bytes=settings.max_teacher_bytes),
            filename=file.filename or "teacher",
            name=name,
            config=config,
            declared=declared,
        )
    elif reference is not None and file is None:
        teacher = service.create_teacher_from_reference(
            session,
            tenant_id=principal.tenant_id,
            store=store,
            reference=reference,
            max_bytes=settings.max_teacher_bytes,
            name=name,
            config=config,
            declared=declared,
        )
    else:
        raise InvalidInput("Send either a teacher `file` or a `reference`.", field="file")
    response.headers["Location"] = f"/v1/teachers/{teacher.id}"
    return idempotency.remember(TeacherOut.model_validate(teacher))


@router.get("", response_model=TeacherList)
def list_teachers(principal: PrincipalDep, session: SessionDep) -> TeacherList:
    """List the tenant's teachers, newest first."""
    teachers = service.list_teachers(session, principal.tenant_id)
    return TeacherList(items=[TeacherOut.model_validate(t) for t in teachers])


@router.get("/{teacher_id}", response_model=TeacherOut)
def get_teacher(principal: PrincipalDep, session: SessionDep, teacher_id: str) -> TeacherOut:
    """One teacher."""
    return TeacherOut.model_validate(service.get_teacher(session, principal.tenant_id, teacher_id))


@router.delete(
    "/{teacher_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(409)
)
def delete_teacher(
    principal: PrincipalDep, session: SessionDep, store: StoreDep, teacher_id: str
) -> Response:
    """Delete a teacher that no unfinished job uses."""
    service.delete_teacher(
        session, tenant_id=principal.tenant_id, store=store, teacher_id=teacher_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
