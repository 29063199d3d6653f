"""Text students and the text plumbing of the loop: dynamic padding, length-grouped batches,
initialisation from the teacher, ONNX export with symbolic batch and sequence dimensions."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from app.ml.onnx_io import export_onnx
from app.ml.signature import TextPreprocessing
from app.ml.students import TextCnnSpec, TransformerSpec, build_student
from app.ml.students import text_cnn as text_cnn_family
from app.ml.students import transformer as transformer_family
from app.ml.students.transformer import every_kth_layer
from app.ml.text import TextTokenizer, TokenizedInputs, text_model_signature
from worker.text_init import init_from_teacher
from worker.training.loop import LENGTH_GROUP_BATCHES, Batch, length_grouped_order

TEACHER_CONFIG = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}
SIGNATURE = text_model_signature(
    3, preprocessing=TextPreprocessing(max_length=32), token_type_ids=True
)


def records(lengths: list[int], width: int, seed: int = 0) -> TokenizedInputs:
    """Random token ids (5..39) right-padded with 0 to ``width``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, 40, n)
        mask[row, :n] = 1
    return TokenizedInputs(ids, mask, np.zeros_like(ids))


def tensors(inputs: TokenizedInputs) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in inputs.arrays.values()]


def students() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    transformer = transformer_family.resolve(TransformerSpec(num_layers=2), TEACHER_CONFIG)
    cnn = text_cnn_family.resolve(TextCnnSpec(channels=8), TEACHER_CONFIG)
    return [build_student(spec, SIGNATURE).eval() for spec in (transformer, cnn)]


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "text_cnn"])
def test_a_record_gets_the_same_logits_however_much_padding_follows_it(index: int) -> None:
    """Dynamic padding changes batch widths from step to step and at serving: a record's
    prediction must not depend on it."""
    student = students()[index]
    alone = records([5], 5)
    padded = records([5], 17)
    with torch.no_grad():
        assert torch.allclose(student(*tensors(alone)), student(*tensors(padded)), atol=1e-5)


def test_every_kth_layer_spreads_the_student_over_the_teacher_ending_with_its_last() -> None:
    assert every_kth_layer(6, 3) == [1, 3, 5]
    assert every_kth_layer(12, 6) == [1, 3, 5, 7, 9, 11]
    assert every_kth_layer(4, 4) == [0, 1, 2, 3]
    assert every_kth_layer(6, 1) == [5]


def test_transformer_student_starts_from_the_chosen_teacher_layers() -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(1)
    config = BertConfig(**{k: v for k, v in TEACHER_CONFIG.items() if k != "model_type"})
    config.num_labels = 3
    teacher = AutoModelForSequenceClassification.from_config(config).eval()  # type: ignore[no-untyped-call]
    spec = transformer_family.resolve(TransformerSpec(num_layers=2), TEACHER_CONFIG)
    assert spec.init == "teacher_layers" and spec.teacher_layers == [1, 3]
    student = build_student(spec, SIGNATURE)
    said = init_from_teacher(student, spec, teacher.state_dict())
    weights = student.state_dict()
    own = teacher.state_dict()
    for student_layer, teacher_layer in ((0, 1), (1, 3)):
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(
            weights["model." + key.format(student_layer)], own[key.format(teacher_layer)]
        )
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(weights["model." + key], own[key])
    total = len(weights)
    assert f"{total} of {total} tensors copied" in said and "[1, 3]" in said


def test_resolving_refuses_what_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="teacher's sizes"):
        transformer_family.resolve(
            TransformerSpec(hidden_size=8, init="teacher_layers"), TEACHER_CONFIG
        )
    with pytest.raises(ValueError, match="not a multiple"):
        transformer_family.resolve(TransformerSpec(hidden_size=10, num_heads=4), TEACHER_CONFIG)
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        transformer_family.resolve(
            TransformerSpec(num_layers=2, teacher_layers=[0, 4]), TEACHER_CONFIG
        )
    with pytest.raises(ValueError, match="Hugging Face teacher"):
        transformer_family.resolve(TransformerSpec(), None)
    narrow = transformer_family.resolve(TransformerSpec(hidden_size=8, num_heads=2), TEACHER_CONFIG)
    assert narrow.init == "random" and narrow.teacher_layers is None
    cnn = text_cnn_family.resolve(TextCnnSpec(embedding_dim=8), TEACHER_CONFIG)
    assert cnn.init == "random" and cnn.vocab_size == 40


def test_text_cnn_takes_the_teachers_word_embeddings() -> None:
    teacher = {"bert.embeddings.word_embeddings.weight": torch.randn(40, 16)}
    spec = text_cnn_family.resolve(TextCnnSpec(channels=4), TEACHER_CONFIG)
    student = build_student(spec, SIGNATURE)
    assert init_from_teacher(student, spec, teacher) == "word embeddings copied from the teacher"
    assert torch.equal(student.embeddings.weight, teacher["bert.embeddings.word_embeddings.weight"])


def test_indexing_tokenised_records_trims_padding_to_the_longest_selected() -> None:
    inputs = records([3, 9, 2, 5], 9)
    picked = inputs[np.array([0, 2])]
    assert picked.input_ids.shape == (2, 3)
    assert picked.lengths.tolist() == [3, 2]
    assert np.array_equal(picked.input_ids, inputs.input_ids[[0, 2], :3])
    batch = Batch(
        inputs={k: torch.from_numpy(v) for k, v in inputs.arrays.items()},
        labels=torch.zeros(4, dtype=torch.int64),
        teacher_logits=torch.zeros(4, 3),
    )
    assert batch[torch.tensor([2, 3])].inputs["input_ids"].shape == (2, 5)
    no_types = TokenizedInputs(inputs.input_ids, inputs.attention_mask)
    fed = no_types.feed(["input_ids", "attention_mask", "token_type_ids"])
    assert np.array_equal(fed["token_type_ids"], np.zeros_like(inputs.input_ids))


def test_length_grouped_order_gives_batches_of_similar_lengths_in_random_order() -> None:
    lengths = torch.from_numpy(np.random.default_rng(0).integers(1, 60, 1001))
    batch_size = 4
    order = length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(1001))
    batches = list(order.split(batch_size))
    assert [len(b) for b in batches] == [4] * 250 + [1]  # full batches, the remainder last
    for batch in batches:  # each batch comes sorted out of one window
        assert torch.equal(lengths[batch], torch.sort(lengths[batch], descending=True).values)

    def padding(o: torch.Tensor) -> int:
        return sum(
            int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in o.split(batch_size)
        )

    random_order = torch.randperm(1001, generator=torch.Generator().manual_seed(0))
    assert padding(order) < padding(random_order) / 5
    # The batches are shuffled: training does not sweep from long records to short ones.
    longest = torch.stack([lengths[b].max() for b in batches[:-1]]).float()
    window = LENGTH_GROUP_BATCHES
    steps = torch.arange(len(longest), dtype=torch.float32) % window
    assert abs(float(torch.corrcoef(torch.stack([steps, longest]))[0, 1])) < 0.3


def test_tokenizer_truncates_counts_and_marks_pair_segments() -> None:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    text = TextTokenizer(tokenizer, max_length=5, pad_token_id=0)
    inputs, truncated = text.encode(["a b", "a b c a b c", "ü 日本"])
    assert truncated == 1
    assert inputs.input_ids.tolist() == [[2, 4, 5, 3, 0], [2, 4, 5, 6, 3], [2, 1, 1, 3, 0]]
    assert inputs.lengths.tolist() == [4, 5, 4]
    pairs, _ = text.encode(["a"], ["b"])
    assert pairs.input_ids.tolist() == [[2, 4, 3, 5, 3]]
    assert pairs.token_type_ids is not None and pairs.token_type_ids.tolist() == [[0, 0, 0, 1, 1]]
    # What the artifact keeps: the tokenizer without this job's truncation, which serving sets.
    again = TextTokenizer.from_str(text.to_str(), TextPreprocessing(max_length=5))
    assert again.encode(["a b c a b c"])[0].input_ids.tolist() == [[2, 4, 5, 6, 3]]


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "text_cnn"])
def test_onnx_export_takes_any_batch_and_length(index: int, tmp_path: Path) -> None:
    student = students()[index]
    path = tmp_path / "student.onnx"
    export_onnx(student, SIGNATURE, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
        ("token_type_ids", "tensor(int64)"),
    ]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)
    for lengths, width in (([3], 3), ([4, 11, 7], 11), ([30] * 5, 30)):
        inputs = records(lengths, width)
        (onnx_logits,) = session.run(["logits"], inputs.arrays)
        with torch.no_grad():
            expected = student(*tensors(inputs)).numpy()
        assert np.allclose(onnx_logits, expected, atol=1e-4)
