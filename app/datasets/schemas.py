from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.datasets.arrays import InputStats
from app.ml.signature import ModelSignature


class DatasetOut(BaseModel):
    ref: str
    kind: Literal["builtin", "uploaded"]
    name: str
    signature: ModelSignature = Field(
        description="The records' inputs and classes, as a teacher's signature must accept them."
    )
    input_shape: list[int] = Field(description="Per-sample shape of the (single) input.")
    num_classes: int
    train_size: int
    test_size: int
    available: bool
    labelled: bool = True
    has_test_split: bool = True
    input_stats: InputStats | None = Field(
        default=None,
        description=(
            "The stored inputs' dtype and value range; null for builtins and older uploads."
        ),
    )
    sha256: str | None = None
    size_bytes: int | None = None
    created_at: datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]
