from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from app.ml.layers import FeatureLayer
from app.ml.signature import ModelSignature
from app.ml.teacher_formats import ScoresChoice


class TeacherOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    parameter_count: int
    signature: ModelSignature = Field(
        description="Named inputs (datatype, per-sample shape), class scores, preprocessing."
    )
    architecture: dict[str, Any] | None
    feature_layers: list[FeatureLayer] | None = Field(
        description="Layers feature methods (`fitnets`, `at`, `sp`, `rkd`) can match, in forward "
        "order; for ONNX, the graph's outputs after the logits. Null for teachers uploaded before "
        "they were listed: upload again to use feature methods."
    )
    scores_choice: ScoresChoice | None = Field(
        description="Which output holds the class scores and how their kind is known; null for "
        "teachers uploaded before it was recorded."
    )
    created_at: datetime

    @computed_field(description="Per-sample input shape (single-input models).")  # type: ignore[prop-decorator]
    @property
    def input_shape(self) -> list[Any] | None:
        return list(self.signature.inputs[0].shape) if len(self.signature.inputs) == 1 else None

    @computed_field(description="The (first) input's name.")  # type: ignore[prop-decorator]
    @property
    def input_name(self) -> str:
        return self.signature.inputs[0].name

    @computed_field(description="The class scores' name.")  # type: ignore[prop-decorator]
    @property
    def output_name(self) -> str:
        return self.signature.scores.name

    @computed_field(description="The number of class scores.")  # type: ignore[prop-decorator]
    @property
    def num_classes(self) -> int:
        return self.signature.num_classes


class TeacherList(BaseModel):
    items: list[TeacherOut]
