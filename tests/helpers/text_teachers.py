"""Tiny text teachers: a synthetic sentiment task, a WordPiece tokenizer for it, and a small
BERT sequence classifier saved as Hugging Face saves one (``save_pretrained``), archived."""

import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "superb", "enjoyable"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "poor", "dull", "horrible"]
NEUTRAL = [
    "the", "a", "movie", "film", "plot", "was", "is", "really", "quite", "story", "acting",
    "ending", "music", "this", "that", "very", "and", "it", "cast", "scenes", "felt", "overall",
]  # fmt: skip
WORDS = [*POSITIVE, *NEGATIVE, *NEUTRAL, ".", ",", "!"]


def synthetic_sentiment(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` short sentences of neutral words and one or two sentiment words of one polarity;
    label 1 for positive, 0 for negative (balanced at random). A bag of words learns it."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(NEUTRAL, k=rng.randint(3, 7))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words) + rng.choice([" .", " !", ""]))
        labels.append(label)
    return texts, labels


def build_tokenizer(words: list[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer over ``words``: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
    [MASK]=4, lowercasing, BERT's pre-tokenizer, and ``[CLS] A [SEP] (B [SEP])`` with segment
    ids 0 and 1."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(words)])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``texts`` as a BERT takes them: int64 ``input_ids``, ``attention_mask`` and
    ``token_type_ids``, ``[N, longest]``, padded with 0."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    arrays = {name: np.zeros((len(texts), width), np.int64) for name in ("ids", "mask", "types")}
    for row, e in enumerate(encodings):
        arrays["ids"][row, : len(e.ids)] = e.ids
        arrays["mask"][row, : len(e.ids)] = 1
        arrays["types"][row, : len(e.ids)] = e.type_ids
    return {
        "input_ids": torch.from_numpy(arrays["ids"]),
        "attention_mask": torch.from_numpy(arrays["mask"]),
        "token_type_ids": torch.from_numpy(arrays["types"]),
    }


def tiny_bert_dir(
    path: Path,
    *,
    num_labels: int = 2,
    id2label: dict[int, str] | None = None,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    train_on: tuple[list[str], list[int]] | None = None,
    steps: int = 400,
) -> Path:
    """A ``BertForSequenceClassification`` saved with ``save_pretrained`` into ``path``, with its
    fast tokenizer (``tokenizer.json``, ``tokenizer_config.json``) over ``WORDS``.

    With ``train_on=(texts, labels)`` it is trained (AdamW, batches of 32, at most ``steps``)
    until it classifies more than 95% of them right; ``RuntimeError`` if it never passes 90%.
    """
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS)
    labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        id2label=labels,  # (and so num_labels)
        label2id={name: i for i, name in labels.items()},
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config)
    if train_on is not None:
        _train(model, tokenizer, *train_on, steps=steps)
    path.mkdir(parents=True, exist_ok=True)
    model.train(False).save_pretrained(path)
    PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    ).save_pretrained(path)
    return path


def _train(
    model: torch.nn.Module, tokenizer: Tokenizer, texts: list[str], labels: list[int], steps: int
) -> None:
    inputs, targets = encode(tokenizer, texts), torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    accuracy = 0.0
    for step in range(1, steps + 1):
        model.train()
        batch = torch.randint(0, len(texts), (32,), generator=generator)
        loss = model(**{k: v[batch] for k, v in inputs.items()}, labels=targets[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                predictions = model(**inputs).logits.argmax(-1)
            accuracy = float((predictions == targets).float().mean())
            if accuracy > 0.95:
                return
    if accuracy <= 0.9:
        raise RuntimeError(f"the tiny BERT reached only {accuracy:.0%} train accuracy")


def zip_dir(directory: Path, path: Path, *, prefix: str = "") -> Path:
    """The files under ``directory`` zipped (deflated) at ``path``, each name after ``prefix``
    (``"model/"``: the folder zipped as a folder)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.write(file, prefix + file.relative_to(directory).as_posix())
    return path


def tar_dir(directory: Path, path: Path, *, prefix: str = "") -> Path:
    """The files under ``directory`` in a gzipped tar at ``path`` (names after ``prefix``)."""
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.add(file, prefix + file.relative_to(directory).as_posix())
    return path
