"""Train a CNN teacher on a builtin dataset with plain PyTorch and export it to ONNX.

Writes ``<out>`` (ONNX, one file) plus ``<stem>.safetensors`` and ``<stem>.config.json`` beside
it, so the same teacher can be uploaded to Distill either way.

    python -m examples.train_teacher                                  # Fashion-MNIST
    python -m examples.train_teacher --dataset builtin:digits
"""

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from torch import nn

from app.datasets.arrays import DatasetArrays
from app.datasets.loading import load_builtin
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec, build_model, family_of, parameter_count
from app.ml.teacher_formats.safetensors import TeacherConfig

SPEC = CnnSpec(channels=[32, 64], hidden_sizes=[512], dropout=0.3)
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1000
PEAK_LR = 3e-3
WEIGHT_DECAY = 5e-4
DEFAULT_EPOCHS = {"builtin:fashion-mnist": 4, "builtin:digits": 20}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", choices=sorted(DEFAULT_EPOCHS), default="builtin:fashion-mnist"
    )
    parser.add_argument("--out", type=Path, help="default: examples/<dataset>_teacher.onnx")
    parser.add_argument("--epochs", type=int, help="default: 4 for fashion-mnist, 20 for digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--force", action="store_true", help="retrain even if --out exists")
    return parser.parse_args()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``."""
    model.eval()
    correct = sum(
        int((model(x[i : i + EVAL_BATCH_SIZE]).argmax(1) == y[i : i + EVAL_BATCH_SIZE]).sum())
        for i in range(0, len(x), EVAL_BATCH_SIZE)
    )
    return correct / len(x)


def train(data: DatasetArrays, epochs: int, seed: int) -> nn.Module:
    """Train the teacher with AdamW and a one-cycle schedule, printing a line per epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model = build_model(SPEC, ModelSignature.for_tensor(data.input_shape, len(data.classes)))
    # channels_last (the cnn family's layout) makes oneDNN's convolutions markedly faster on CPU.
    family_of(SPEC).apply_memory_format(model)
    steps_per_epoch = -(-len(x_train) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=PEAK_LR, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        total_loss = 0.0
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), BATCH_SIZE):
            batch = order[i : i + BATCH_SIZE]
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        test_accuracy = accuracy(model, x_test, y_test)
        print(
            f"epoch {epoch}/{epochs}  loss {total_loss / len(x_train):.4f}  "
            f"test accuracy {test_accuracy:.4f}  {time.perf_counter() - start:.1f}s",
            flush=True,
        )
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return model.eval()


def save_weights(model: nn.Module, data: DatasetArrays, out: Path) -> tuple[Path, Path]:
    """Write the safetensors weights and the architecture config beside ``out``."""
    weights = out.with_suffix(".safetensors")
    config = out.with_suffix(".config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    # Validated as Distill will validate the upload's `config` form field.
    teacher_config = TeacherConfig(
        architecture=SPEC, input_shape=list(data.input_shape), num_classes=len(data.classes)
    )
    config.write_text(json.dumps(teacher_config.model_dump(mode="json"), indent=2) + "\n")
    return weights, config


def export_onnx(model: nn.Module, data: DatasetArrays, out: Path) -> None:
    """Export with the dynamo exporter (dynamic batch) and check it against torch."""
    example = torch.from_numpy(data.x_test[:2])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    sample = data.x_test[:16]
    with torch.inference_mode():
        expected = model(torch.from_numpy(sample)).numpy()
    diff = float(np.abs(session.run(None, {"input": sample})[0] - expected).max())
    if diff >= 1e-3:
        raise RuntimeError(f"ONNX output differs from torch by {diff:.2e}")
    predictions = np.concatenate(
        [
            session.run(None, {"input": data.x_test[i : i + EVAL_BATCH_SIZE]})[0].argmax(1)
            for i in range(0, len(data.x_test), EVAL_BATCH_SIZE)
        ]
    )
    onnx_accuracy = float((predictions == data.y_test).mean())
    print(f"onnx: max abs diff vs torch {diff:.1e}, test accuracy {onnx_accuracy:.4f}")


def main() -> None:
    args = parse_args()
    if args.out is None:
        name = args.dataset.removeprefix("builtin:")
        args.out = Path(__file__).resolve().parent / f"{name}_teacher.onnx"
    if args.out.exists() and not args.force:
        print(f"{args.out} exists, reusing it (pass --force to retrain)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_builtin(args.dataset)
    start = time.perf_counter()
    model = train(data, args.epochs or DEFAULT_EPOCHS[args.dataset], args.seed)
    test_accuracy = accuracy(model, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    print(
        f"final test accuracy {test_accuracy:.4f}  parameters {parameter_count(model):,}  "
        f"training {time.perf_counter() - start:.0f}s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    weights, config = save_weights(model, data, args.out)
    export_onnx(model, data, args.out)
    print(f"wrote {args.out}, {weights}, {config}")


if __name__ == "__main__":
    main()
