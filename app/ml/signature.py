"""The model signature: what a teacher, a dataset, a student and an artifact take and return.

One type for all four, so that a job is checked by comparing signatures (``check_compatible``)
instead of threading shapes and class counts through the code. Tensor datatypes are spelled as
the Open Inference Protocol (KServe v2 / Triton) spells them; per-sample shapes may carry
symbolic dimensions such as ``"sequence"``, and the batch dimension is implicit (always first).
"""

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SymbolicDim = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=32)]
Dim = Annotated[int, Field(ge=1)] | SymbolicDim
MAX_RANK = 16  # per-sample dimensions of one tensor
# What Distill names a single input and the class scores when nothing else names them.
INPUT_NAME, LOGITS_NAME = "input", "logits"


class Datatype(StrEnum):
    """Tensor element types, named as the Open Inference Protocol names them."""

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"
    FP64 = "FP64"
    INT64 = "INT64"
    INT32 = "INT32"
    BYTES = "BYTES"


# Distill controls what it feeds a model: float data is cast to whichever float type it declares.
FLOAT_DATATYPES = frozenset({Datatype.FP32, Datatype.FP16, Datatype.BF16, Datatype.FP64})


class OutputKind(StrEnum):
    """What a model's class scores are. Losses and metrics always work on logits; the other two
    are turned into logits exactly (their log) before use."""

    LOGITS = "logits"
    PROBABILITIES = "probabilities"
    LOG_PROBABILITIES = "log_probabilities"


class Task(StrEnum):
    CLASSIFICATION = "classification"  # one label per sample: outputs [batch, classes]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TensorSpec(_Frozen):
    name: str = Field(min_length=1, max_length=255)
    datatype: Datatype = Datatype.FP32
    shape: list[Dim] = Field(
        max_length=MAX_RANK,
        description="Per sample, without the batch dimension; names are symbolic.",
    )

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The per-sample shape when every dimension is fixed, else None."""
        if all(isinstance(d, int) for d in self.shape):
            return tuple(int(d) for d in self.shape)
        return None


class OutputSpec(TensorSpec):
    kind: OutputKind = OutputKind.LOGITS
    classes: list[str] | None = Field(
        default=None, description="Class names, one per score; None when only counted."
    )


class RawTensors(_Frozen):
    """The inputs are the model's tensors as they are (an uploaded `.npz`, say)."""

    kind: Literal["tensor"] = "tensor"


class ImagePreprocessing(_Frozen):
    """How image inputs ``[C, H, W]`` are made from pixels: ``(pixel * scale - mean) / std`` per
    channel, in ``channel_order``. ``mean``/``std`` None: the model takes ``pixel * scale`` and
    normalises itself (Distill's builtin images are scaled to [0, 1]). A description of the
    inputs: the model (and ``/predict``) takes them already made."""

    kind: Literal["image"] = "image"
    scale: float = Field(default=1.0 / 255.0, gt=0.0)
    mean: list[float] | None = Field(default=None, max_length=4)
    std: list[Annotated[float, Field(gt=0.0)]] | None = Field(default=None, max_length=4)
    channel_order: Literal["RGB", "BGR", "L"] = "RGB"


class TextPreprocessing(_Frozen):
    """Text records tokenised into ``input_ids`` (and masks) of at most ``max_length`` tokens,
    special tokens included, padded with ``pad_token_id`` (``app.ml.text``)."""

    kind: Literal["text"] = "text"
    tokenizer: str = Field(
        default="tokenizer.json", description="The tokenizer file stored with the model."
    )
    max_length: int = Field(default=128, ge=2, le=8192)
    pad_token_id: int = Field(default=0, ge=0)
    pairs: bool = Field(default=False, description="Records are sentence pairs (two texts).")


class ColumnEncoder(_Frozen):
    name: str = Field(min_length=1, max_length=255)
    encoding: Literal["numeric", "one_hot", "ordinal"] = "numeric"
    categories: list[str] | None = None


class TablePreprocessing(_Frozen):
    """Named table columns encoded into one float vector, in this order."""

    kind: Literal["table"] = "table"
    columns: list[ColumnEncoder] = Field(min_length=1)


AnyPreprocessing = RawTensors | ImagePreprocessing | TextPreprocessing | TablePreprocessing
Preprocessing = Annotated[AnyPreprocessing, Field(discriminator="kind")]


class SignatureMismatch(ValueError):
    """Two signatures cannot be joined; ``field`` says which part disagrees."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field, self.detail = field, detail


class ModelSignature(_Frozen):
    """Named, typed inputs and outputs of a model (or of a dataset's records).

    Shapes are per sample. ``outputs[0]`` holds the class scores, shaped ``[classes]`` (the
    tensor is ``[batch, classes]``); further outputs are other tensors a model returns.
    """

    task: Task = Task.CLASSIFICATION
    inputs: list[TensorSpec] = Field(min_length=1, max_length=16)
    outputs: list[OutputSpec] = Field(min_length=1, max_length=64)
    preprocessing: Preprocessing = RawTensors()

    @model_validator(mode="after")
    def _scores_are_classes(self) -> "ModelSignature":
        # Class scores end in a fixed class dimension; a classification has nothing before it
        # (token classification, when it comes, will have `sequence`).
        scores = self.outputs[0]
        rank = {Task.CLASSIFICATION: 1}[self.task]
        if len(scores.shape) != rank or not isinstance(scores.shape[-1], int):
            raise ValueError(f"outputs[0] must be class scores [classes]; got {scores.shape}")
        if scores.classes is not None and len(scores.classes) != scores.shape[-1]:
            raise ValueError(
                f"outputs[0] has {scores.shape[-1]} scores but {len(scores.classes)} class names"
            )
        return self

    @classmethod
    def for_tensor(
        cls,
        input_shape: tuple[int, ...] | list[int],
        num_classes: int,
        *,
        input_name: str = INPUT_NAME,
        output_name: str = LOGITS_NAME,
        classes: list[str] | None = None,
        kind: OutputKind = OutputKind.LOGITS,
        preprocessing: AnyPreprocessing | None = None,
    ) -> "ModelSignature":
        """One float32 tensor in, class scores out: the shape of every model Distill built
        before signatures existed."""
        return cls(
            inputs=[TensorSpec(name=input_name, shape=list(input_shape))],
            outputs=[OutputSpec(name=output_name, shape=[num_classes], classes=classes, kind=kind)],
            preprocessing=preprocessing or RawTensors(),
        )

    @property
    def scores(self) -> OutputSpec:
        return self.outputs[0]

    @property
    def num_classes(self) -> int:
        return int(self.scores.shape[-1])

    @property
    def class_names(self) -> list[str]:
        """Class names, by index where none are given."""
        return self.scores.classes or [str(i) for i in range(self.num_classes)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample shape of a single, fixed-shape input.

        Raises:
            SignatureMismatch: several inputs, or symbolic dimensions.
        """
        shape = self.inputs[0].static_shape if len(self.inputs) == 1 else None
        if shape is None:
            raise SignatureMismatch(
                "inputs", f"expected one input of fixed shape; got {self.describe_inputs()}"
            )
        return shape

    def describe_inputs(self) -> str:
        return ", ".join(f"{t.name}: {t.datatype} {t.shape}" for t in self.inputs)


def check_compatible(model: ModelSignature, data: ModelSignature, *, field: str) -> None:
    """Can ``data`` (a dataset's signature) feed ``model`` (a teacher's)?

    Inputs are matched by position; datatypes must agree (any float type feeds any other:
    Distill casts) and fixed dimensions must be equal (a symbolic model dimension takes any
    size). The data may have fewer classes than the model scores (a teacher trained on a
    superset), never more.

    Raises:
        SignatureMismatch: naming ``field`` and the first disagreement.
    """
    if model.task != data.task:
        raise SignatureMismatch(
            field, f"the teacher's task is {model.task}, the data's {data.task}"
        )
    if isinstance(model.preprocessing, TextPreprocessing) or any(
        t.datatype == Datatype.BYTES for t in data.inputs
    ):
        _check_text(model, data, field)
    elif len(model.inputs) != len(data.inputs):
        raise SignatureMismatch(
            field,
            f"The teacher takes {len(model.inputs)} input(s) ({model.describe_inputs()}); the "
            f"data gives {len(data.inputs)} ({data.describe_inputs()}).",
        )
    for expected, given in zip(model.inputs, data.inputs, strict=False):
        if isinstance(model.preprocessing, TextPreprocessing):
            break  # texts are tokenised with the model's tokenizer
        fixed_equal = len(expected.shape) == len(given.shape) and all(
            isinstance(e, str) or e == g for e, g in zip(expected.shape, given.shape, strict=True)
        )
        castable = {expected.datatype, given.datatype} <= FLOAT_DATATYPES
        if (expected.datatype != given.datatype and not castable) or not fixed_equal:
            raise SignatureMismatch(
                field,
                f"The dataset's samples are {given.datatype} shaped {given.shape} but the "
                f"teacher's input `{expected.name}` takes {expected.datatype} {expected.shape}.",
            )
    if data.num_classes > model.num_classes:
        raise SignatureMismatch(
            field,
            f"The dataset has {data.num_classes} classes but the teacher outputs only "
            f"{model.num_classes} logits.",
        )


def _check_text(model: ModelSignature, data: ModelSignature, field: str) -> None:
    """A text model takes a text dataset's records (one string, or two for pairs), tokenised
    with its tokenizer; a text dataset feeds only a text model."""
    texts = [t for t in data.inputs if t.datatype == Datatype.BYTES]
    if not isinstance(model.preprocessing, TextPreprocessing):
        raise SignatureMismatch(
            field,
            f"The dataset holds text but the teacher takes {model.describe_inputs()}: distil text "
            "from a text teacher (a Hugging Face model, or an ONNX graph with its tokenizer).",
        )
    if not texts or len(texts) != len(data.inputs) or len(texts) > 2:
        raise SignatureMismatch(
            field,
            f"The teacher takes tokenised text; the dataset gives {data.describe_inputs()}. "
            "Upload a text dataset (CSV, TSV, JSONL or Parquet with a text column).",
        )
