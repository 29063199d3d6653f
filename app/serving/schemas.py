from typing import Any

from pydantic import BaseModel, Field


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        description="A batch of samples, each shaped like the student's input signature.",
        min_length=1,
    )


class PredictResponse(BaseModel):
    predictions: list[int]
    labels: list[str]
    probabilities: list[list[float]]
