from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.auth import PrincipalDep
from app.config import Settings
from app.datasets import service
from app.datasets.images import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, parse_image_size
from app.datasets.npz import parse_classes
from app.datasets.schemas import DatasetList, DatasetOut
from app.dependencies import SessionDep, SettingsDep, StoreDep
from app.errors import problem_responses
from app.idempotency import IdempotencyDep

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def decoding_budget(settings: Settings) -> int:
    """Bytes the API may take to decode and check one upload: the memory budget, and never
    more than 4x the upload limit (a server that takes small uploads decodes small ones)."""
    return min(settings.max_dataset_memory_bytes, 4 * settings.max_dataset_bytes)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses=problem_responses(409, 413, 415, 507),
)
def upload_dataset(
    principal: PrincipalDep,
    idempotency: IdempotencyDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    file: Annotated[
        UploadFile,
        File(
            description="`.npz` arrays; an image-folder archive (`.zip`, `.tar`, `.tar.gz`, "
            "`.tgz`: `<class>/<image>`, `train/` and `test/` folders of those, or a "
            "`labels.csv` of `file,label`; PNG, JPEG or WebP); or text records: `.csv`, `.tsv` "
            "(GLUE's: no quoting), "
            "`.jsonl`/`.ndjson` or `.parquet`, in UTF-8. A text file's test split is a `split` "
            "column (`train`; `test`, `dev` or `validation`), or `test_file`, else 20% held "
            "out at a fixed seed. Refusals name records by number: the first record (the row "
            "under a CSV/TSV header, the first JSON line) is 1; blank lines are not counted."
        ),
    ],
    name: Annotated[str | None, Form(max_length=255)] = None,
    classes: Annotated[
        str | None,
        Form(
            description="JSON list of unique class names, one per label value (index 0 "
            "included). Without it, labels must start at 0 and classes are only counted; text "
            "labels that are names are then sorted."
        ),
    ] = None,
    test_file: Annotated[
        UploadFile | None,
        File(description="Text only: the test split, with the same columns as `file`."),
    ] = None,
    text_column: Annotated[
        str | None,
        Form(
            max_length=255,
            description="Text only: the column holding the text (default: `text`, `sentence`, "
            "`sentence1`, `premise`, `question`, `question1`, `review` or `content`, else the "
            "only string column).",
        ),
    ] = None,
    text_pair_column: Annotated[
        str | None,
        Form(
            max_length=255,
            description="Text only: the column holding a sentence pair's second text (default: "
            "`text_pair`, `sentence2`, `hypothesis` or `question2`, after `text`, `sentence1`, "
            "`premise` or `question1`).",
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        Form(
            max_length=255,
            description="Text only: the column holding the labels, class indices or names "
            "(default: `label`, `labels`, `target`, `class` or `y`; none: an unlabelled "
            "transfer set, which needs a labelled test split).",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        Form(
            max_length=32,
            description="Images only: resize every image (bicubic, no crop) to this size in "
            f"pixels, `64` or width x height `64x48`, each side {MIN_IMAGE_SIDE} to "
            f"{MAX_IMAGE_SIDE}. Without it every image must have the same size.",
        ),
    ] = None,
) -> DatasetOut | Response:
    """Upload a dataset: `.npz` arrays (`x`, `y`, optionally `x_test`, `y_test`), an
    image-folder archive, or text records (CSV, TSV, JSON lines or Parquet)."""
    if idempotency.replay is not None:
        return idempotency.replay
    names = None if classes is None else parse_classes(classes)
    size = None if image_size is None else parse_image_size(image_size)
    dataset = service.upload_dataset(
        session,
        tenant_id=principal.tenant_id,
        store=store,
        file=file.file,
        filename=file.filename or "",
        test_file=None if test_file is None else test_file.file,
        test_filename=None if test_file is None else test_file.filename or "",
        name=(name or file.filename or "dataset")[:255],
        classes=names,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        image_size=size,
        max_bytes=settings.max_dataset_bytes,
        decoding_budget=decoding_budget(settings),
    )
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return idempotency.remember(service.uploaded_out(dataset, store))


@router.get("", response_model=DatasetList)
def list_datasets(principal: PrincipalDep, session: SessionDep, store: StoreDep) -> DatasetList:
    """The builtin datasets (with whether this server has their files) and the tenant's
    uploads."""
    return DatasetList(items=service.list_datasets(session, principal.tenant_id, store))


@router.delete("/{ref}", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(409))
def delete_dataset(
    principal: PrincipalDep, session: SessionDep, store: StoreDep, ref: str
) -> Response:
    """Delete an uploaded dataset that no unfinished job uses (jobs that used it keep their
    results)."""
    service.delete_dataset(session, principal.tenant_id, store, ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{ref}", response_model=DatasetOut)
def get_dataset(
    principal: PrincipalDep, session: SessionDep, store: StoreDep, ref: str
) -> DatasetOut:
    """One dataset: a builtin one by its `builtin:<name>` ref, an uploaded one by its id."""
    return service.dataset_out(session, principal.tenant_id, store, ref)
