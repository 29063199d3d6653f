from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


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
    created_at: datetime


class TeacherList(BaseModel):
    items: list[TeacherOut]
