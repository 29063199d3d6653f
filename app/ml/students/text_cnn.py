"""Convolutional text students for CPU-bound serving: word-piece embeddings, 1-D convolutions of
several widths, max-pooling over the tokens, a small classifier (Kim 2014, "Convolutional neural
networks for sentence classification"; distilled from BERT as in Tang et al. 2019, "Distilling
task-specific knowledge from BERT into simple neural networks", who use a BiLSTM).

A convolution, unlike a bidirectional recurrence, gives each real token the same output however
much padding follows the record (padding embeddings are zeroed, odd kernels are centred), so a
record's prediction never depends on the batch it is served in.
"""

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from app.ml.signature import ModelSignature
from app.ml.students.base import StudentFamily, StudentSpecBase, Width, classifier_head
from app.ml.students.transformer import NO_WEIGHTS, runs_on_onnx
from app.ml.text import is_text


class TextCnnSpec(StudentSpecBase):
    """Embeddings of ``embedding_dim`` (default: the teacher's hidden size, initialised from the
    teacher's word embeddings), ``channels`` filters per kernel size, max over tokens, then an
    MLP head (random embeddings from an ONNX teacher, which gives no weights). ``vocab_size`` is
    set at submission from the teacher's tokenizer."""

    architecture: Literal["text_cnn"] = "text_cnn"
    embedding_dim: Width | None = None
    kernel_sizes: list[int] = Field(default=[3, 5], min_length=1, max_length=8)
    channels: Width = 256
    hidden_sizes: list[Width] = Field(default=[], max_length=8)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    init: Literal["teacher_embeddings", "random"] | None = None
    vocab_size: int | None = Field(default=None, ge=2)

    @field_validator("kernel_sizes")
    @classmethod
    def _odd(cls, sizes: list[int]) -> list[int]:
        if any(k < 1 or k > 15 or k % 2 == 0 for k in sizes):
            raise ValueError("kernel sizes must be odd, from 1 to 15 (centred on each token)")
        return sizes


class TextCnn(nn.Module):
    """``input_ids``, ``attention_mask`` (None: no padding), int64 ``[batch, tokens]`` ->
    logits ``[batch, classes]``. ``token_type_ids`` is taken, to share the teacher's inputs,
    and not used."""

    def __init__(self, spec: TextCnnSpec, num_classes: int) -> None:
        super().__init__()
        assert spec.vocab_size is not None and spec.embedding_dim is not None, "resolved"
        self.embeddings = nn.Embedding(spec.vocab_size, spec.embedding_dim)
        self.convolutions = nn.ModuleList(
            nn.Conv1d(spec.embedding_dim, spec.channels, k, padding=k // 2)
            for k in spec.kernel_sizes
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Sequential(
            *classifier_head(
                spec.channels * len(spec.kernel_sizes), spec.hidden_sizes, spec.dropout, num_classes
            )
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(1).to(torch.float32)  # [batch, 1, tokens]
        x = (self.embeddings(input_ids) * mask.transpose(1, 2)).transpose(1, 2)
        # ReLU outputs are >= 0, so zeroing the padding positions leaves each max unchanged.
        pooled = [(torch.relu(conv(x)) * mask).amax(dim=2) for conv in self.convolutions]
        result: Tensor = self.head(self.dropout(torch.cat(pooled, dim=1)))
        return result


def build(spec: TextCnnSpec, signature: ModelSignature) -> nn.Module:
    return TextCnn(spec, signature.num_classes)


def accepts(signature: ModelSignature) -> str | None:
    if not is_text(signature):
        return "a text_cnn student takes tokenised text: distil it from a text teacher"
    return None


def resolve(spec: TextCnnSpec, teacher_config: dict[str, Any] | None) -> TextCnnSpec:
    """``spec`` with its vocabulary, embedding size and initialisation settled from the
    teacher's config.

    Raises:
        ValueError: no Hugging Face teacher config; ``teacher_embeddings`` with another
            embedding size than the teacher's hidden size.
    """
    if teacher_config is None or "vocab_size" not in teacher_config:
        raise ValueError(
            "a text_cnn student shares its teacher's vocabulary: use a Hugging Face teacher "
            "(with its `config.json`)"
        )
    onnx = runs_on_onnx(teacher_config)
    if onnx and spec.init == "teacher_embeddings":
        raise ValueError(
            f"init `teacher_embeddings` copies the teacher's word embeddings, but {NO_WEIGHTS}: "
            "use init `random`"
        )
    hidden = int(teacher_config.get("embedding_size") or teacher_config["hidden_size"])
    dim = spec.embedding_dim or hidden
    init = spec.init or ("teacher_embeddings" if dim == hidden and not onnx else "random")
    if init == "teacher_embeddings" and dim != hidden:
        raise ValueError(
            f"init `teacher_embeddings` needs embedding_dim {hidden} (the teacher's); got {dim}"
        )
    return spec.model_copy(
        update={
            "embedding_dim": dim,
            "init": init,
            "vocab_size": int(teacher_config["vocab_size"]),
        }
    )


TEXT_CNN = StudentFamily(
    name="text_cnn", spec=TextCnnSpec, build=build, accepts=accepts, int8="dynamic", resolve=resolve
)
