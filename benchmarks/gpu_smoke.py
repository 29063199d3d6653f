"""One distillation run on CUDA with bf16 autocast against the same run on the CPU.

Fashion-MNIST-shaped data (the real set when its files are present, otherwise synthetic), a CNN
teacher's logits computed once, an MLP [128] student trained by the engine's loop. Prints samples
per second on each device and the ratio, and fails if the CUDA run is not finite or learns less.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.methods import KnowledgeDistillation  # noqa: E402
from app.jobs.schemas import Training  # noqa: E402
from app.ml.signature import ModelSignature  # noqa: E402
from app.ml.students import CnnSpec, MlpSpec, build_model, build_student  # noqa: E402
from worker.evaluation import accuracy  # noqa: E402
from worker.losses import build_loss  # noqa: E402
from worker.training.loop import Batch, LoopState, predict_logits, train  # noqa: E402

# Fashion-MNIST's shape: one 28x28 grey image in, ten classes out.
SIGNATURE = ModelSignature.for_tensor((1, 28, 28), 10)


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from app.datasets.loading import load_builtin

        arrays = load_builtin("builtin:fashion-mnist")
        assert arrays.y_train is not None  # the builtin set is labelled
        return torch.from_numpy(arrays.x_train[:n]), torch.from_numpy(arrays.y_train[:n])
    except Exception:  # no dataset files or no scikit-learn on the GPU host: synthetic images
        generator = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (n,), generator=generator)
        x = torch.rand(n, 1, 28, 28, generator=generator) * 0.5
        x[torch.arange(n), 0, y * 2, :] += 0.5  # a class-dependent stripe, learnable
        return x, y


class Sink:
    """The loop's callbacks: keeps each epoch's throughput, ignores the rest. (Not the recipe's
    ``SilentEvents``: importing the recipe would need the database packages on the GPU host.)"""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.rates.append(values["samples_per_second"])

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, state: LoopState) -> None:
        pass


def batch(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> Batch:
    return Batch(inputs={SIGNATURE.inputs[0].name: x}, labels=y, teacher_logits=logits)


def run(device: torch.device, x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple[float, float]:
    torch.manual_seed(0)
    teacher = build_model(CnnSpec(channels=[32, 64], hidden_sizes=[512]), SIGNATURE)
    teacher = teacher.to(device).eval().requires_grad_(False)
    x, y = x.to(device), y.to(device)
    logits = predict_logits(teacher, x)
    split = int(len(x) * 0.9)
    train_split = batch(x[:split], y[:split], logits[:split])
    val_split = batch(x[split:], y[split:], logits[split:])
    student = build_student(MlpSpec(hidden_sizes=[128]), SIGNATURE, fit_inputs=x).to(device)
    sink = Sink()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train(
        student,
        build_loss(KnowledgeDistillation()),
        train_split,
        val_split,
        Training(epochs=epochs, batch_size=512),
        sink,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )
    agreement = accuracy(predict_logits(student, val_split.x), val_split.teacher_logits.argmax(-1))
    return max(sink.rates[1:] or sink.rates), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this smoke test is for a GPU machine.")
    x, y = data(args.samples)
    started = time.perf_counter()
    cuda_rate, cuda_agreement = run(torch.device("cuda"), x, y, args.epochs)
    cpu_rate, cpu_agreement = run(torch.device("cpu"), x, y, args.epochs)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'':24}{'samples/s':>12}{'agreement':>11}")
    print(f"{'cuda, bf16 autocast':24}{cuda_rate:12,.0f}{cuda_agreement:11.4f}")
    print(f"{'cpu, float32':24}{cpu_rate:12,.0f}{cpu_agreement:11.4f}")
    print(
        f"cuda / cpu: {cuda_rate / cpu_rate:.1f}x   ({time.perf_counter() - started:.0f} s in all)"
    )
    if not cuda_agreement >= cpu_agreement - 0.05:
        raise SystemExit("The bf16 CUDA run learned markedly less than the CPU run.")


if __name__ == "__main__":
    main()
