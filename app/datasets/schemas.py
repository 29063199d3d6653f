from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class DatasetOut(BaseModel):
    ref: str
    kind: Literal["builtin", "uploaded"]
    name: str
    input_shape: list[int]
    num_classes: int
    train_size: int
    test_size: int
    available: bool
    labelled: bool = True
    has_test_split: bool = True
    sha256: str | None = None
    size_bytes: int | None = None
    created_at: datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]
