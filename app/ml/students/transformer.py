"""Transformer students: a smaller encoder of the teacher's own model type (BERT, RoBERTa,
ELECTRA...), built from its ``transformers`` config class, sharing its tokenizer and vocabulary.

With the teacher's width (hidden size, heads, intermediate size) the student can start from
the teacher's weights, DistilBERT style (Sanh et al. 2019, "DistilBERT, a distilled version of
BERT"): embeddings, pooler and classifier copied, and one teacher layer per student layer.
"""

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from app.ml.signature import ModelSignature
from app.ml.students.base import StudentFamily, StudentSpecBase
from app.ml.text import is_text

# Keys of a teacher's config that describe the task or the file, not the encoder.
_NOT_ARCHITECTURE = {
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "auto_map",
    "distill",  # what Distill recorded of the teacher (DISTILL_KEY)
}
# A Hugging Face teacher's `architecture` holds what Distill found under `distill`; its `runtime`
# is `onnx` for an ONNX export (Optimum's layout), whose weights no student can take.
DISTILL_KEY, RUNTIME, ONNX_RUNTIME = "distill", "runtime", "onnx"
NO_WEIGHTS = (
    "an ONNX teacher gives no weights to start from (its graph is run as it is, never read "
    "into torch)"
)


def runs_on_onnx(teacher_config: dict[str, Any] | None) -> bool:
    """Is the teacher an ONNX graph (a Hugging Face folder exported to ONNX)?"""
    found = (teacher_config or {}).get(DISTILL_KEY)
    return isinstance(found, dict) and found.get(RUNTIME) == ONNX_RUNTIME


class TransformerSpec(StudentSpecBase):
    """An encoder of ``num_layers`` layers; sizes default to the teacher's.

    ``init``: ``teacher_layers`` copies the teacher's embeddings, pooler, classifier and the
    layers ``teacher_layers`` (default: evenly spaced, ending with the last, e.g. 1, 3, 5 of 6);
    it needs the teacher's hidden, head and intermediate sizes. ``random``: from scratch.
    Default: ``teacher_layers`` when the sizes allow it and the teacher runs on torch (an ONNX
    teacher gives no weights).
    ``dropout`` applies to hidden states and, unless ``attention_dropout`` is given, to the
    attention probabilities; a job transferring attention distributions (``attention_kl``) sets
    ``attention_dropout`` to 0 (``attention_transfer_student``).
    ``base_config`` is filled at submission from the teacher's config (what the student shares
    with it: model type, vocabulary, positions); a user does not set it.
    """

    architecture: Literal["transformer"] = "transformer"
    num_layers: int = Field(default=3, ge=1, le=48)
    hidden_size: int | None = Field(default=None, ge=8, le=8192)
    num_heads: int | None = Field(default=None, ge=1, le=128)
    intermediate_size: int | None = Field(default=None, ge=8, le=32_768)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    attention_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    init: Literal["teacher_layers", "random"] | None = None
    teacher_layers: list[int] | None = Field(default=None, max_length=48)
    base_config: dict[str, Any] | None = None


def every_kth_layer(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for each student layer, the last included:
    ``round((i + 1) * T / S) - 1``; e.g. 6 -> 3: ``[1, 3, 5]``; 12 -> 6: ``[1, 3, ..., 11]``."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def base_config(teacher_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a teacher's config a student of its type shares."""
    return {k: v for k, v in teacher_config.items() if k not in _NOT_ARCHITECTURE}


def student_config(spec: TransformerSpec, num_classes: int) -> Any:
    """The student's ``transformers`` config (``PretrainedConfig``)."""
    from transformers import AutoConfig

    assert spec.base_config is not None, "resolved at submission"
    base = dict(spec.base_config)
    model_type = base.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        **{
            **base,
            "num_hidden_layers": spec.num_layers,
            "hidden_size": spec.hidden_size or base["hidden_size"],
            "num_attention_heads": spec.num_heads or base["num_attention_heads"],
            "intermediate_size": spec.intermediate_size or base["intermediate_size"],
            "hidden_dropout_prob": spec.dropout,
            "attention_probs_dropout_prob": (
                spec.dropout if spec.attention_dropout is None else spec.attention_dropout
            ),
            "num_labels": num_classes,
            # Attention weights are plain tensors (attention-distribution methods read them);
            # it also runs on the meta device, which sizes the student at submission.
            "attn_implementation": "eager",
        },
    )


class TransformerClassifier(nn.Module):
    """A ``transformers`` sequence classifier taking ``input_ids``, ``attention_mask`` and (for
    models with segment embeddings) ``token_type_ids``, each int64 ``[batch, tokens]``, in the
    signature's order (inputs left out take the model's defaults), and returning logits
    ``[batch, classes]``: the shape ONNX export and the loop expect."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        optional = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        given = {name: t for name, t in optional.items() if t is not None}
        logits: Tensor = self.model(input_ids=input_ids, **given).logits
        return logits


def build(spec: TransformerSpec, signature: ModelSignature) -> nn.Module:
    """Token ids ``[batch, tokens]`` (and masks) -> logits ``[batch, classes]``, randomly
    initialised (``worker.text_init`` copies teacher weights into it)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(  # type: ignore[no-untyped-call]
        student_config(spec, signature.num_classes)
    )
    return TransformerClassifier(model)


def accepts(signature: ModelSignature) -> str | None:
    if not is_text(signature):
        return "a transformer student takes tokenised text: distil it from a text teacher"
    return None


def resolve(spec: TransformerSpec, teacher_config: dict[str, Any] | None) -> TransformerSpec:
    """``spec`` with its sizes, initialisation and ``base_config`` settled from the teacher's
    config.

    Raises:
        ValueError: no Hugging Face teacher config; sizes that do not fit (hidden size not a
            multiple of the heads); ``teacher_layers`` initialisation with other sizes than the
            teacher's, or naming layers the teacher lacks.
    """
    if teacher_config is None or "model_type" not in teacher_config:
        raise ValueError(
            "a transformer student is built from its teacher's config: use a Hugging Face teacher "
            "(with its `config.json`)"
        )
    onnx = runs_on_onnx(teacher_config)
    if onnx and spec.init == "teacher_layers":
        raise ValueError(
            f"init `teacher_layers` copies the teacher's layers, but {NO_WEIGHTS}: use init "
            "`random`"
        )
    base = base_config(teacher_config)
    teacher_sizes = (base["hidden_size"], base["num_attention_heads"], base["intermediate_size"])
    sizes = (
        spec.hidden_size or teacher_sizes[0],
        spec.num_heads or teacher_sizes[1],
        spec.intermediate_size or teacher_sizes[2],
    )
    if sizes[0] % sizes[1]:
        raise ValueError(f"hidden_size {sizes[0]} is not a multiple of num_heads {sizes[1]}")
    depth = int(base["num_hidden_layers"])
    init = spec.init or (
        "teacher_layers"
        if not onnx and sizes == teacher_sizes and spec.num_layers <= depth
        else "random"
    )
    layers = None
    if init == "teacher_layers":
        if sizes != teacher_sizes:
            raise ValueError(
                f"init `teacher_layers` needs the teacher's sizes (hidden_size, num_heads, "
                f"intermediate_size) {list(teacher_sizes)}; got {list(sizes)}: leave them unset "
                "or use init `random`"
            )
        layers = spec.teacher_layers or every_kth_layer(depth, spec.num_layers)
        if len(layers) != spec.num_layers or not all(0 <= i < depth for i in layers):
            raise ValueError(
                f"teacher_layers must name {spec.num_layers} of the teacher's layers 0..{depth - 1}"
                f"; got {layers}"
            )
    return spec.model_copy(
        update={
            "hidden_size": sizes[0],
            "num_heads": sizes[1],
            "intermediate_size": sizes[2],
            "init": init,
            "teacher_layers": layers,
            "base_config": base,
        }
    )


TRANSFORMER = StudentFamily(
    name="transformer",
    spec=TransformerSpec,
    build=build,
    accepts=accepts,
    int8="dynamic",
    resolve=resolve,
)
