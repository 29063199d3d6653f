"""Text students started from their teacher's weights (training-only code).

A ``transformer`` student of the teacher's width takes the teacher's embeddings, pooler and
classifier, and one teacher layer per student layer (DistilBERT, Sanh et al. 2019: "we
initialize the student from the teacher by taking one layer out of two"); a ``text_cnn``
student of the teacher's hidden size takes its word embeddings.
"""

import re

import torch
from torch import nn

from app.ml.students import StudentSpecBase, TextCnnSpec, TransformerSpec

# An encoder layer's parameters in every BERT-family model: `<prefix>.layer.<i>.<rest>`.
_LAYER = re.compile(r"^(.*\.layer\.)(\d+)(\..+)$")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


@torch.no_grad()
def _copy_transformer(
    student: nn.Module, spec: TransformerSpec, teacher: dict[str, torch.Tensor]
) -> str:
    assert spec.teacher_layers is not None  # resolved at submission
    copied, total = 0, 0
    for key, tensor in student.state_dict().items():
        name = key.removeprefix("model.")  # TransformerClassifier wraps the transformers model
        match = _LAYER.match(name)
        source = (
            name if match is None else f"{match[1]}{spec.teacher_layers[int(match[2])]}{match[3]}"
        )
        total += 1
        weight = teacher.get(source)
        if weight is not None and weight.shape == tensor.shape:
            tensor.copy_(weight)
            copied += 1
    return (
        f"from teacher layers {spec.teacher_layers} (DistilBERT style): {copied} of {total} "
        "tensors copied (embeddings, those layers, pooler and classifier)"
    )


def needs_teacher_weights(spec: StudentSpecBase) -> bool:
    """Does ``spec.init`` copy from the teacher (an ONNX teacher has no weights to give)?"""
    return (isinstance(spec, TransformerSpec) and spec.init == "teacher_layers") or (
        isinstance(spec, TextCnnSpec) and spec.init == "teacher_embeddings"
    )


@torch.no_grad()
def init_from_teacher(
    student: nn.Module, spec: StudentSpecBase, teacher: dict[str, torch.Tensor]
) -> str:
    """Copy what ``spec.init`` asks for from the teacher's weights ``teacher`` (its
    ``state_dict``) into ``student``; returns how the student was initialised, for the result.

    Raises:
        ValueError: the teacher has no word embeddings to copy.
    """
    if isinstance(spec, TransformerSpec) and spec.init == "teacher_layers":
        return _copy_transformer(student, spec, teacher)
    if isinstance(spec, TextCnnSpec) and spec.init == "teacher_embeddings":
        source = next((k for k in teacher if k.endswith(WORD_EMBEDDINGS)), None)
        if source is None:
            raise ValueError("the teacher has no word embeddings to copy")
        embeddings = student.get_submodule("embeddings")
        assert isinstance(embeddings, nn.Embedding)
        embeddings.weight.copy_(teacher[source])
        return "word embeddings copied from the teacher"
    return "random"
