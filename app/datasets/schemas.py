from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.datasets.arrays import InputStats
from app.datasets.text import TextStats
from app.ml.signature import ModelSignature


class DatasetOut(BaseModel):
    ref: str
    kind: Literal["builtin", "uploaded"]
    modality: Literal["tensor", "text"] = Field(
        description="`tensor`: each record is an array (an `.npz`, builtin images); `text`: a "
        "string, or two for sentence pairs."
    )
    name: str
    signature: ModelSignature = Field(
        description="The records' inputs and classes, as a teacher's signature must accept them."
    )
    input_shape: list[int] | None = Field(
        description="Per-sample shape of the (single) input; null for text."
    )
    num_classes: int
    train_size: int
    test_size: int
    available: bool
    labelled: bool = True
    has_test_split: bool = True
    input_stats: InputStats | None = Field(
        default=None,
        description=(
            "The stored inputs' dtype and value range; null for text, builtins and older uploads."
        ),
    )
    text_stats: TextStats | None = Field(
        default=None,
        description="Text: the records (both splits), characters per text, whether in pairs.",
    )
    sha256: str | None = Field(
        default=None, description="Of the stored file (text: its Parquet form)."
    )
    size_bytes: int | None = Field(
        default=None, description="Of the stored file (text: its Parquet form)."
    )
    created_at: datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]
