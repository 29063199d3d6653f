"""Text as models take it: tokenised records, the tokenizer that makes them, text signatures.

A text model (a Hugging Face teacher, a ``transformer`` or ``text_cnn`` student) takes int64
``input_ids`` and ``attention_mask`` (and, for models with segment embeddings, ``token_type_ids``),
each ``[batch, sequence]``; the sequence dimension is symbolic. Records are tokenised once, with
the teacher's own tokenizer (``tokenizer.json``, run by Hugging Face's fast ``tokenizers``), and
padded only to the longest record of each batch (dynamic padding), never to ``max_length``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from app.ml.signature import (
    LOGITS_NAME,
    Datatype,
    ModelSignature,
    OutputKind,
    OutputSpec,
    TensorSpec,
    TextPreprocessing,
)

INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
# A text dataset's records: one text column, and a second one for sentence pairs (NLI, say).
TEXT, TEXT_PAIR = "text", "text_pair"
SEQUENCE = "sequence"
TOKENIZER_FILE = "tokenizer.json"
# Latency of text models is measured on records of this many tokens (stated in the result).
LATENCY_TOKENS = 64
# A transformer's layers as text feature methods name them (as `transformers` returns them).
HIDDEN_STATES, ATTENTIONS = "hidden_states", "attentions"


def layer_index(name: str) -> tuple[str, int]:
    """``"hidden_states.3"`` -> ``("hidden_states", 3)``.

    Raises:
        ValueError: not ``hidden_states.<i>`` or ``attentions.<i>``.
    """
    kind, _, index = name.partition(".")
    if kind not in (HIDDEN_STATES, ATTENTIONS) or not index.isdigit():
        raise ValueError(f"{name!r} is not `{HIDDEN_STATES}.<i>` or `{ATTENTIONS}.<i>`")
    return kind, int(index)


@dataclass(frozen=True)
class TokenizedInputs:
    """Tokenised records: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``,
    each int64 ``[N, L]``, right-padded (``pad_token_id``, mask 0) to the longest record.

    Indexing selects records and trims the padding to the longest of them (dynamic padding), so
    a batch of short records is short whatever the longest record of the set.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per record, ``[N]`` int64."""
        lengths: np.ndarray = self.attention_mask.sum(axis=1)
        return lengths

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors by input name (``token_type_ids`` only when there are some)."""
        arrays = {INPUT_IDS: self.input_ids, ATTENTION_MASK: self.attention_mask}
        if self.token_type_ids is not None:
            arrays[TOKEN_TYPE_IDS] = self.token_type_ids
        return arrays

    def __getitem__(self, index: slice | np.ndarray) -> "TokenizedInputs":
        mask = self.attention_mask[index]
        width = max(1, int(mask.sum(axis=1).max())) if len(mask) else 1
        return TokenizedInputs(
            np.ascontiguousarray(self.input_ids[index][:, :width]),
            np.ascontiguousarray(mask[:, :width]),
            None
            if self.token_type_ids is None
            else np.ascontiguousarray(self.token_type_ids[index][:, :width]),
        )

    def feed(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The tensors a model with inputs ``names`` takes; ``token_type_ids`` are zeros (one
        segment) when the records have none."""
        arrays = self.arrays
        return {
            name: arrays.get(name, np.zeros_like(self.input_ids))
            if name == TOKEN_TYPE_IDS
            else arrays[name]
            for name in names
        }


class TextTokenizer:
    """A fast tokenizer (``tokenizers.Tokenizer``) that truncates to ``max_length`` tokens
    (special tokens included) and pads with ``pad_token_id``."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token_id: int) -> None:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self.tokenizer, self.max_length, self.pad_token_id = tokenizer, max_length, pad_token_id

    @classmethod
    def from_file(cls, path: Path, preprocessing: TextPreprocessing) -> "TextTokenizer":
        return cls(
            Tokenizer.from_file(str(path)), preprocessing.max_length, preprocessing.pad_token_id
        )

    @classmethod
    def from_str(cls, text: str, preprocessing: TextPreprocessing) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text), preprocessing.max_length, preprocessing.pad_token_id)

    def to_str(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (without the truncation set here)."""
        copy = Tokenizer.from_str(self.tokenizer.to_str())
        copy.no_truncation()
        return str(copy.to_str())

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None
    ) -> tuple[TokenizedInputs, int]:
        """Tokenise ``texts`` (with ``pairs``: sentence pairs) into records padded to the
        longest; also returns how many records were truncated to ``max_length``."""
        batch = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encodings = self.tokenizer.encode_batch(batch, add_special_tokens=True)
        width = max((len(e.ids) for e in encodings), default=1) or 1
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        truncated = 0
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids
            truncated += bool(encoding.overflowing)
        return TokenizedInputs(ids, mask, types), truncated


def is_text(signature: ModelSignature) -> bool:
    """Does the model take tokenised text?"""
    return isinstance(signature.preprocessing, TextPreprocessing)


def text_model_signature(
    num_classes: int,
    *,
    preprocessing: TextPreprocessing,
    token_type_ids: bool,
    classes: list[str] | None = None,
    kind: OutputKind = OutputKind.LOGITS,
    output_name: str = LOGITS_NAME,
) -> ModelSignature:
    """The signature of a text classifier: int64 ``input_ids``, ``attention_mask`` (and
    ``token_type_ids``), each ``[sequence]`` per record; class scores ``[classes]``."""
    names = [INPUT_IDS, ATTENTION_MASK] + ([TOKEN_TYPE_IDS] if token_type_ids else [])
    return ModelSignature(
        inputs=[TensorSpec(name=n, datatype=Datatype.INT64, shape=[SEQUENCE]) for n in names],
        outputs=[OutputSpec(name=output_name, shape=[num_classes], classes=classes, kind=kind)],
        preprocessing=preprocessing,
    )


def text_records_signature(
    num_classes: int, *, pairs: bool, classes: list[str] | None = None
) -> ModelSignature:
    """The signature of a text dataset's records: one string (two for pairs) per record."""
    names = [TEXT, TEXT_PAIR] if pairs else [TEXT]
    return ModelSignature(
        inputs=[TensorSpec(name=n, datatype=Datatype.BYTES, shape=[]) for n in names],
        outputs=[OutputSpec(name=LOGITS_NAME, shape=[num_classes], classes=classes)],
    )
