"""Distill's engine against a plain PyTorch distillation loop, side by side in one process.

Same teacher (the example Fashion-MNIST CNN, ~1.6M parameters), same student (MLP [128]), same
training split, epochs, batch size, optimiser, loss and seed. The plain loop is written the usual
way: a DataLoader over the dataset and a teacher forward pass at every step. The engine is the
worker's own code path (teacher outputs computed once and cached, in-memory batches by indexing,
fused optimiser). Only ratios measured in this one run are meaningful; the machine is shared.

    python benchmarks/train_speed.py [--epochs 5] [--threads 2]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.datasets.arrays import DatasetArrays  # noqa: E402
from app.jobs.methods import KnowledgeDistillation  # noqa: E402
from app.jobs.schemas import DistillationSpec, Training  # noqa: E402
from app.ml.signature import ModelSignature  # noqa: E402
from app.ml.students import MlpSpec, build_student  # noqa: E402
from app.ml.teacher_formats.safetensors import TorchTeacher  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import build_loss  # noqa: E402
from worker.recipe import (  # noqa: E402
    DistillationRecipe,
    RecipeInputs,
    SilentEvents,
    split_validation,
)
from worker.teachers import TeacherRecord  # noqa: E402
from worker.training.loop import predict_logits  # noqa: E402

DATASET = "builtin:fashion-mnist"
STUDENT = MlpSpec(hidden_sizes=[128])
METHOD = KnowledgeDistillation(temperature=4.0, alpha=0.9)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 matmul throughput over several runs: the machine's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def student_train_flops_per_sample(model: nn.Module) -> float:
    """Forward FLOPs of the Linear layers (2 per multiply-add), times 3 for forward + backward."""
    forward = sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    return 3.0 * forward


def plain_loop(
    teacher: nn.Module,
    signature: ModelSignature,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[float, list[float], float]:
    """The loop as usually written: DataLoader, teacher forward under no_grad at every step."""
    torch.manual_seed(seed)
    student = build_student(STUDENT, signature, fit_inputs=x)
    optimizer = torch.optim.Adam(student.parameters(), lr=learning_rate)
    loss_fn = build_loss(METHOD)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    epoch_seconds = []
    started = time.perf_counter()
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        student.train()
        for inputs, labels in loader:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss, _ = loss_fn(student(inputs), teacher_logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - epoch_start)
    total = time.perf_counter() - started
    return total, epoch_seconds, accuracy(predict_logits(student, x_test), y_test)


class EpochTimes(SilentEvents):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.seconds.append(values["epoch_seconds"])


def engine(
    teacher: TeacherRecord,
    cache_dir: Path,
    data: DatasetArrays,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[float, list[float], float, bool]:
    """The worker's recipe: cached teacher outputs, then the engine's loop; best-val student."""
    spec = DistillationSpec(
        teacher=teacher.id,
        dataset=DATASET,
        student=STUDENT,
        distillation=METHOD,
        training=Training(
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed
        ),
    )
    times = EpochTimes()
    recipe = DistillationRecipe(
        RecipeInputs(
            job_id="train-speed",
            spec=spec,
            teachers=[teacher],
            data=data,
            device=torch.device("cpu"),
            artifact_dir=cache_dir / "artifact",  # unused: no export
            cache_dir=cache_dir,
        ),
        events=times,
    )
    # Opening the teacher stays outside the timing, as for the plain loop's teacher.
    recipe.prepare()
    started = time.perf_counter()
    recipe.teacher_outputs()
    recipe.train()  # leaves the best epoch's state in recipe.student
    test = recipe.test_split
    test_accuracy = accuracy(predict_logits(recipe.student, test.x), test.labels)
    return time.perf_counter() - started, times.seconds, test_accuracy, all(recipe.cache_hits)


def later(seconds: list[float]) -> float:
    """The median epoch after the first (which pays for warm-up), or the only one."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam, both loops")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", type=Path, default=ROOT / "examples" / "fashion-mnist_teacher")
    parser.add_argument("--skip-torch-teacher", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from app.datasets.loading import load_builtin

    data = load_builtin(DATASET)
    assert data.y_train is not None
    onnx_teacher = TeacherRecord.from_file(args.teacher.with_suffix(".onnx"))
    torch_teacher = TeacherRecord.from_file(
        args.teacher.with_suffix(".safetensors"),
        json.loads(args.teacher.with_suffix(".config.json").read_text()),
    )
    signature = onnx_teacher.signature
    torch_backend = torch_teacher.open(torch.device("cpu"))
    assert isinstance(torch_backend, TorchTeacher)
    # The plain loop's teacher as usually loaded: the default (NCHW) layout, not the engine's
    # channels-last.
    plain_teacher = torch_backend.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]

    peak = matmul_peak_gflops()
    # The plain loop trains on the same examples as the engine (its validation split held out).
    train_arrays, _ = split_validation(data.x_train, data.y_train, data.y_train, args.seed)
    x, y = torch.from_numpy(train_arrays[0]), torch.from_numpy(train_arrays[1])
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    rows = []
    plain_total, plain_epochs, plain_acc = plain_loop(
        plain_teacher,
        signature,
        x,
        y,
        x_test,
        y_test,
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.seed,
    )
    rows.append(
        ("plain PyTorch loop (torch teacher every step)", plain_total, plain_epochs, plain_acc)
    )
    with tempfile.TemporaryDirectory() as cache:
        run_engine = partial(
            engine,
            cache_dir=Path(cache),
            data=data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
        for label, expect_hit in (
            ("engine, uncached (teacher pass included)", False),
            ("engine, cached teacher outputs", True),
        ):
            total, epochs, acc, hit = run_engine(onnx_teacher)
            assert hit == expect_hit
            rows.append((label, total, epochs, acc))
        if not args.skip_torch_teacher:
            total, epochs, acc, _ = run_engine(torch_teacher)
            rows.append(
                ("engine, uncached, torch teacher instead of onnxruntime", total, epochs, acc)
            )

    n = len(x)
    flops = student_train_flops_per_sample(build_student(STUDENT, signature)) * n
    ideal = flops / (peak * 1e9)
    print(
        f"\nFashion-MNIST, MLP {STUDENT.hidden_sizes} student, {args.epochs} epochs, batch "
        f"{args.batch_size}, Adam {args.learning_rate:g}, {n:,} training samples, "
        f"{args.threads} threads"
    )
    print(
        f"measured float32 matmul peak: {peak:.1f} GFLOP/s; student fwd+bwd per epoch: "
        f"{flops / 1e9:.1f} GFLOP -> {ideal:.3f} s at peak\n"
    )
    print(
        f"{'':58}{'job s':>8}{'x plain':>9}{'epoch>1 s':>11}{'samples/s':>11}{'x plain':>9}"
        f"{'test acc':>10}"
    )
    plain_later = later(plain_epochs)
    for label, total, epochs, acc in rows:
        epoch_time = later(epochs)
        print(
            f"{label:58}{total:8.1f}{plain_total / total:9.1f}{epoch_time:11.3f}"
            f"{n / epoch_time:11,.0f}{plain_later / epoch_time:9.1f}{acc:10.4f}"
        )
    # Best against best: the peak is the fastest of several matmuls, so compare the fastest epoch.
    engine_epoch = min(s for _, _, epochs, _ in rows[1:3] for s in epochs[1:] or epochs)
    print(
        f"\nfastest engine epoch after the first: {engine_epoch:.3f} s = "
        f"{engine_epoch / ideal:.2f}x the time its FLOPs take at the measured peak"
    )


if __name__ == "__main__":
    main()
