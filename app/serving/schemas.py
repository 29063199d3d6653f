from typing import Any

from pydantic import BaseModel, Field


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        description="A batch of samples, each shaped like the student's input signature; for "
        'a text student, strings (or `["text", "text pair"]` lists for sentence pairs); for an '
        "image student, arrays or encoded images (base64 PNG, JPEG or WebP, or a "
        "`data:image/png;base64,...` URL), mixed as you like, decoded and resized to its input.",
        min_length=1,
    )


class PredictResponse(BaseModel):
    predictions: list[int]
    labels: list[str]
    probabilities: list[list[float]]


class AliasRequest(BaseModel):
    alias: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="The name to serve the student by (Open Inference Protocol model name).",
    )


class AliasResponse(BaseModel):
    job_id: str
    alias: str | None
