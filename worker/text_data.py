"""Text records tokenised once per (records, tokenizer, maximum length), and kept.

A job's text dataset is tokenised with its teacher's tokenizer before anything runs; the result
is cached by content (the records' digest and the tokenizer's own JSON), so a second job on the
same dataset and teacher family starts from the token ids.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from app.datasets.arrays import DatasetArrays
from app.datasets.text import TextRecords
from app.datasets.tokenized import tokenize_records
from app.ml.signature import TextPreprocessing
from app.ml.text import TextTokenizer, TokenizedInputs

_SPLITS = ("train", "test")


def _key(records: TextRecords, tokenizer: TextTokenizer) -> str:
    digest = hashlib.sha256()
    for part in (
        records.digest(),
        tokenizer.to_str(),
        tokenizer.max_length,
        tokenizer.pad_token_id,
    ):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()


def _save(path: Path, splits: dict[str, TokenizedInputs], truncated: int) -> None:
    """Compact on disk (int32 ids, int8 masks), written atomically."""
    arrays: dict[str, np.ndarray] = {"truncated": np.asarray(truncated)}
    for split, inputs in splits.items():
        arrays[f"{split}_input_ids"] = inputs.input_ids.astype(np.int32)
        arrays[f"{split}_attention_mask"] = inputs.attention_mask.astype(np.int8)
        if inputs.token_type_ids is not None:
            arrays[f"{split}_token_type_ids"] = inputs.token_type_ids.astype(np.int8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(f.name, path)


def _load(path: Path) -> tuple[dict[str, TokenizedInputs], int]:
    with np.load(path, allow_pickle=False) as stored:
        splits = {
            split: TokenizedInputs(
                stored[f"{split}_input_ids"].astype(np.int64),
                stored[f"{split}_attention_mask"].astype(np.int64),
                stored[f"{split}_token_type_ids"].astype(np.int64)
                if f"{split}_token_type_ids" in stored
                else None,
            )
            for split in _SPLITS
        }
        return splits, int(stored["truncated"])


def cached_tokenize_records(
    records: TextRecords,
    tokenizer: TextTokenizer,
    preprocessing: TextPreprocessing,
    cache_dir: Path | None = None,
) -> tuple[DatasetArrays, int]:
    """``tokenize_records``, read from ``cache_dir`` when this tokenisation was done before
    (None: never cached)."""
    path = None if cache_dir is None else cache_dir / f"{_key(records, tokenizer)}.npz"
    if path is None or not path.is_file():
        data, truncated = tokenize_records(records, tokenizer, preprocessing)
        if path is not None:
            assert isinstance(data.x_train, TokenizedInputs)
            assert isinstance(data.x_test, TokenizedInputs)
            _save(path, {"train": data.x_train, "test": data.x_test}, truncated)
        return data, truncated
    splits, truncated = _load(path)
    data = DatasetArrays(
        splits["train"],
        records.y_train,
        splits["test"],
        records.y_test,
        records.classes,
        preprocessing,
    )
    return data, truncated
