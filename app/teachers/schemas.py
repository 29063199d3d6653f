from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.ml.layers import FeatureLayer


class TeacherOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    parameter_count: int
    input_shape: list[int]
    num_classes: int
    input_name: str | None
    output_name: str | None
    architecture: dict[str, Any] | None
    feature_layers: list[FeatureLayer] | None = Field(
        description="Layers feature methods (`fitnets`, `at`, `sp`, `rkd`) can match, in forward "
        "order; for ONNX, the graph's outputs after the logits. Null for teachers uploaded before "
        "they were listed: upload again to use feature methods."
    )
    created_at: datetime


class TeacherList(BaseModel):
    items: list[TeacherOut]
