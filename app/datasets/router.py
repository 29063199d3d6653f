from typing import Annotated

from fastapi import APIRouter, Form, UploadFile, status

from app.config import Settings
from app.datasets import service
from app.datasets.npz import parse_classes
from app.datasets.schemas import DatasetList, DatasetOut
from app.dependencies import SessionDep, SettingsDep, StoreDep

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def decoding_budget(settings: Settings) -> int:
    """Bytes the API may take to decode and check one upload: the memory budget, and never
    more than 4x the upload limit (a server that takes small uploads decodes small ones)."""
    return min(settings.max_dataset_memory_bytes, 4 * settings.max_dataset_bytes)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def upload_dataset(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: UploadFile,
    name: Annotated[str | None, Form(max_length=255)] = None,
    classes: Annotated[
        str | None,
        Form(
            description="JSON list of unique class names, one per label value (index 0 "
            "included). Without it, labels must start at 0 and classes are only counted."
        ),
    ] = None,
) -> DatasetOut:
    """Upload an `.npz` dataset with arrays `x`, `y` and optionally `x_test`, `y_test`."""
    names = None if classes is None else parse_classes(classes)
    upload = store.receive(file.file, max_bytes=settings.max_dataset_bytes)
    dataset = service.create_dataset(
        session,
        store=store,
        upload=upload,
        max_bytes=decoding_budget(settings),
        name=(name or file.filename or "dataset")[:255],
        classes=names,
    )
    return service.uploaded_out(dataset)


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep) -> DatasetList:
    """The builtin datasets (with whether this server has their files) and the uploaded ones."""
    return DatasetList(items=service.list_datasets(session))


@router.get("/{ref}", response_model=DatasetOut)
def get_dataset(session: SessionDep, ref: str) -> DatasetOut:
    """One dataset: a builtin one by its `builtin:<name>` ref, an uploaded one by its id."""
    return service.dataset_out(session, ref)
