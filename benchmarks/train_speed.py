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

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.schemas import Training  # noqa: E402
from app.ml.architectures import MlpSpec, build_student  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import KDLoss  # noqa: E402
from worker.pipeline import split_validation  # noqa: E402
from worker.teacher_cache import cache_key, cached_teacher_logits  # noqa: E402
from worker.teachers import TeacherRunner  # noqa: E402
from worker.training.loop import Split, predict_logits, train  # noqa: E402

STUDENT = MlpSpec(hidden_sizes=[128])


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
    student = build_student(STUDENT, (1, 28, 28), 10, fit_inputs=x)
    optimizer = torch.optim.Adam(student.parameters(), lr=learning_rate)
    loss_fn = KDLoss(4.0, 0.9)
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


class EpochTimes:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.seconds.append(values["epoch_seconds"])


def engine(
    runner: TeacherRunner,
    teacher_sha: str,
    cache_dir: Path,
    data: object,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[float, list[float], float, bool]:
    """The worker's path: cached teacher outputs, then the engine's loop; best-val student."""
    started = time.perf_counter()
    logits, hit = cached_teacher_logits(
        cache_dir,
        cache_key(teacher_sha, data.digest()),  # type: ignore[attr-defined]
        {"train": data.x_train, "test": data.x_test},
        runner.logits,  # type: ignore[attr-defined]
    )
    train_arrays, val_arrays = split_validation(
        data.x_train,
        data.y_train,
        logits["train"],
        seed,  # type: ignore[attr-defined]
    )
    train_split = Split(*(torch.from_numpy(np.ascontiguousarray(a)) for a in train_arrays))
    val_split = Split(*(torch.from_numpy(np.ascontiguousarray(a)) for a in val_arrays))
    torch.manual_seed(seed)
    student = build_student(STUDENT, (1, 28, 28), 10, fit_inputs=train_split.x)
    times = EpochTimes()
    training = Training(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed
    )
    outcome = train(
        student,
        KDLoss(4.0, 0.9),
        train_split,
        val_split,
        training,
        times,
        lambda: False,
        lambda state: None,
    )
    student.load_state_dict(outcome.state.best_state)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)  # type: ignore[attr-defined]
    test_accuracy = accuracy(predict_logits(student, x_test), y_test)
    return time.perf_counter() - started, times.seconds, test_accuracy, hit


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

    from app.storage import sha256_file
    from worker.data import load_builtin

    data = load_builtin("builtin:fashion-mnist")
    onnx_path = args.teacher.with_suffix(".onnx")
    weights = args.teacher.with_suffix(".safetensors")
    config = json.loads(args.teacher.with_suffix(".config.json").read_text())
    cpu = torch.device("cpu")
    torch_teacher_runner = TeacherRunner(weights, "safetensors", config, cpu)
    assert torch_teacher_runner.model is not None
    onnx_runner = TeacherRunner(onnx_path, "onnx", None, cpu)

    peak = matmul_peak_gflops()
    # The plain loop trains on the same examples as the engine (its validation split held out).
    train_arrays, _ = split_validation(data.x_train, data.y_train, data.y_train, args.seed)
    x, y = torch.from_numpy(train_arrays[0]), torch.from_numpy(train_arrays[1])
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    rows = []
    plain_total, plain_epochs, plain_acc = plain_loop(
        torch_teacher_runner.model,
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
        onnx_sha = sha256_file(onnx_path)
        for label, expect_hit in (
            ("engine, uncached (teacher pass included)", False),
            ("engine, cached teacher outputs", True),
        ):
            total, epochs, acc, hit = run_engine(onnx_runner, onnx_sha)
            assert hit == expect_hit
            rows.append((label, total, epochs, acc))
        if not args.skip_torch_teacher:
            total, epochs, acc, _ = run_engine(torch_teacher_runner, sha256_file(weights))
            rows.append(
                ("engine, uncached, torch teacher instead of onnxruntime", total, epochs, acc)
            )

    n = len(x)
    flops = student_train_flops_per_sample(build_student(STUDENT, (1, 28, 28), 10)) * n
    ideal = flops / (peak * 1e9)
    later = lambda seconds: statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]  # noqa: E731
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
