from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.datasets.arrays import InputStats, input_stats
from app.datasets.builtins import BUILTIN_DATASETS, BuiltinDataset
from app.datasets.npz import check_labels, holdout_test_size, read_dataset_npz
from app.datasets.schemas import DatasetOut
from app.errors import DatasetUnavailable, InvalidSpec, NotFound
from app.ml.signature import ModelSignature
from app.models import Dataset
from app.storage import ArtifactStore, StoredFile, keys, remove_on_rollback


@dataclass(frozen=True)
class DatasetSummary:
    """What job validation needs to know of a dataset reference."""

    ref: str
    signature: ModelSignature
    train_size: int


def uploaded_out(dataset: Dataset) -> DatasetOut:
    signature = ModelSignature.model_validate(dataset.signature)
    return DatasetOut(
        ref=dataset.id,
        kind="uploaded",
        name=dataset.name,
        signature=signature,
        input_shape=list(signature.input_shape),
        num_classes=signature.num_classes,
        train_size=dataset.train_size,
        test_size=dataset.test_size,
        available=True,
        labelled=dataset.labelled,
        has_test_split=dataset.has_test_split,
        input_stats=(
            None if dataset.input_stats is None else InputStats.model_validate(dataset.input_stats)
        ),
        sha256=dataset.sha256,
        size_bytes=dataset.size_bytes,
        created_at=dataset.created_at,
    )


def builtin_out(dataset: BuiltinDataset) -> DatasetOut:
    return DatasetOut(
        ref=dataset.ref,
        kind="builtin",
        name=dataset.description,
        signature=dataset.signature,
        input_shape=list(dataset.input_shape),
        num_classes=dataset.num_classes,
        train_size=dataset.train_size,
        test_size=dataset.test_size,
        available=dataset.available(),
    )


def list_datasets(session: Session) -> list[DatasetOut]:
    uploaded = session.scalars(select(Dataset).order_by(Dataset.created_at.desc()))
    return [builtin_out(d) for d in BUILTIN_DATASETS.values()] + [uploaded_out(d) for d in uploaded]


def dataset_out(session: Session, ref: str) -> DatasetOut:
    """A builtin dataset by its ``builtin:<name>`` ref, or an uploaded one by id."""
    builtin = BUILTIN_DATASETS.get(ref)
    if builtin is not None:
        return builtin_out(builtin)
    return uploaded_out(get_dataset(session, ref))


def create_dataset(
    session: Session,
    *,
    store: ArtifactStore,
    upload: StoredFile,
    max_bytes: int,
    name: str,
    classes: list[str] | None = None,
) -> Dataset:
    """Check the staged ``.npz`` fully (shapes, dtypes, labels, NaN) before keeping it. The
    staged file is removed if this fails for any reason, and the kept one if the request's
    transaction rolls back.

    ``classes`` names the label values (``parse_classes``); without it labels must start at 0.
    """
    with store.holding(upload):
        data = read_dataset_npz(upload.path, max_bytes=max_bytes)
        check_labels(data, classes)
        stats = input_stats(data.x, data.x_test, dtype=data.x_dtype)
        if data.x_test is None:
            test_size = holdout_test_size(len(data.x))
            train_size = len(data.x) - test_size
        else:
            train_size, test_size = len(data.x), len(data.x_test)
        dataset = Dataset(
            name=name,
            sha256=upload.sha256,
            size_bytes=upload.size_bytes,
            signature=ModelSignature.for_tensor(
                data.input_shape,
                data.num_classes if classes is None else len(classes),
                classes=classes,
            ).model_dump(mode="json"),
            train_size=train_size,
            test_size=test_size,
            has_test_split=data.x_test is not None,
            labelled=data.y is not None,
            input_stats=stats.model_dump(mode="json"),
            storage_key="",
        )
        session.add(dataset)
        session.flush()
        dataset.storage_key = keys.dataset(dataset.id)
        remove_on_rollback(session, store, keys.dataset_dir(dataset.id))
        store.adopt(upload.path, dataset.storage_key)
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"No dataset with id {dataset_id}.")
    return dataset


def resolve_dataset(session: Session, ref: str) -> DatasetSummary:
    """Look up a dataset reference (``builtin:<name>`` or an uploaded id) for validation."""
    if ref.startswith("builtin:"):
        builtin = BUILTIN_DATASETS.get(ref)
        if builtin is None:
            raise InvalidSpec(
                f"No builtin dataset {ref!r}; choose one of {sorted(BUILTIN_DATASETS)}.",
                field="dataset",
            )
        if not builtin.available():
            raise DatasetUnavailable(
                f"{ref} is not installed on this server: {builtin.install_hint}.",
                field="dataset",
            )
        return DatasetSummary(ref, builtin.signature, builtin.train_size)
    dataset = session.get(Dataset, ref)
    if dataset is None:
        raise InvalidSpec(f"No dataset with id {ref}.", field="dataset")
    signature = ModelSignature.model_validate(dataset.signature)
    return DatasetSummary(ref, signature, dataset.train_size)
