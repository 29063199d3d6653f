"""The distillation loop: pure torch, no database. It reports through a MetricSink and asks
``should_stop`` between steps, so the pipeline decides what progress and cancel mean."""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from worker.evaluation import accuracy, agreement

LossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


class MetricSink(Protocol):
    def progress(self, fraction: float) -> None: ...

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class Split:
    """Inputs, labels and the teacher's logits for the same samples, already on the device."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    eval_batch_size: int = 4096


@dataclass
class LoopOutcome:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    stopped: bool


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train(
    student: nn.Module,
    loss_fn: LossFn,
    train_split: Split,
    val_split: Split,
    config: LoopConfig,
    sink: MetricSink,
    should_stop: Callable[[], bool],
) -> LoopOutcome:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.learning_rate)
    n = len(train_split)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    teacher_val_accuracy = accuracy(val_split.teacher_logits, val_split.y)
    best = LoopOutcome(copy.deepcopy(student.state_dict()), 0, -1.0, stopped=False)

    for epoch in range(1, config.epochs + 1):
        student.train()
        started = time.perf_counter()
        # Batches by indexing one permutation of the in-memory tensors: no per-sample Python.
        order = torch.randperm(n, generator=generator).to(train_split.x.device)
        totals: dict[str, torch.Tensor] = {}
        for step in range(steps_per_epoch):
            if should_stop():
                best.stopped = True
                return best
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss, terms = loss_fn(
                student(train_split.x[idx]), train_split.teacher_logits[idx], train_split.y[idx]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            # Sum on the device; .item() only once per epoch (each one is a sync point).
            for name, value in {"loss": loss.detach(), **terms}.items():
                totals[name] = totals.get(name, torch.zeros((), device=value.device)) + value
            sink.progress(
                ((epoch - 1) * steps_per_epoch + step + 1) / (config.epochs * steps_per_epoch)
            )

        val_logits = predict_logits(student, val_split.x, config.eval_batch_size)
        values = {f"train_{k}": (v / steps_per_epoch).item() for k, v in totals.items()}
        values |= {
            "val_accuracy": accuracy(val_logits, val_split.y),
            "teacher_val_accuracy": teacher_val_accuracy,
            "val_agreement": agreement(val_logits, val_split.teacher_logits),
            "epoch_seconds": time.perf_counter() - started,
            "samples_per_second": n / (time.perf_counter() - started),
        }
        sink.epoch_end(epoch, values)
        if values["val_accuracy"] > best.best_val_accuracy:
            best = LoopOutcome(
                copy.deepcopy(student.state_dict()), epoch, values["val_accuracy"], stopped=False
            )
    return best
