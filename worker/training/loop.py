"""The distillation loop: pure torch, no database. It reports through its ``Callbacks`` (progress,
per-epoch metrics), asks them ``should_stop`` between steps and hands them a checkpoint after every
epoch, so the caller decides what progress, cancel and persistence mean."""

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from app.jobs.schemas import Training
from app.ml.hooks import FeatureTap, TransformerTap
from app.ml.text import ATTENTION_MASK
from worker.augment import Mix
from worker.evaluation import logit_metrics
from worker.losses.mixed import mixed_label_loss

# Length-grouped batches (text) are drawn from windows of this many batches of a random order,
# sorted by length within each window: batches of similar lengths, still shuffled.
LENGTH_GROUP_BATCHES = 50
# Records per forward pass when a text model is evaluated.
TEXT_BATCH = 128


class Callbacks(Protocol):
    def progress(self, fraction: float) -> None:
        """After every step: the fraction of all steps done."""

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        """After every epoch: its training terms and validation metrics."""

    def should_stop(self) -> bool:
        """Asked before every step: stop now (a cancel)."""

    def save_checkpoint(self, state: "LoopState") -> None:
        """After every epoch: what a resumed run continues from."""


@dataclass(frozen=True)
class Batch:
    """Samples as the loop sees them, already on the device: the named inputs (in the
    signature's order), labels ``[N]``, an optional padding ``mask`` (token methods), the
    teacher's logits ``[N, classes]`` and, for feature methods, its hooked outputs ``[N, ...]``.

    A whole split is one ``Batch``; indexing it with sample indices gives a mini-batch. Text
    inputs (an ``attention_mask`` among them, ``[N, tokens]``) are trimmed to the longest
    record of the mini-batch: dynamic padding.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_features: tuple[torch.Tensor, ...] = ()
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: torch.Tensor) -> "Batch":
        inputs = {name: x[idx] for name, x in self.inputs.items()}
        if ATTENTION_MASK in inputs:
            width = max(1, int(inputs[ATTENTION_MASK].sum(dim=1).max().item()))
            inputs = {name: x[:, :width] for name, x in inputs.items()}
        return Batch(
            inputs=inputs,
            labels=self.labels[idx],
            teacher_logits=self.teacher_logits[idx],
            teacher_features=tuple(f[idx] for f in self.teacher_features),
            mask=None if self.mask is None else self.mask[idx],
        )

    @property
    def x(self) -> torch.Tensor:
        """The single input of a one-input signature."""
        (x,) = self.inputs.values()
        return x

    @property
    def lengths(self) -> torch.Tensor | None:
        """Real tokens per record ``[N]`` for text inputs, else None."""
        mask = self.inputs.get(ATTENTION_MASK)
        return None if mask is None else mask.sum(dim=1)


def length_grouped_order(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A random order of the records in which each run of ``batch_size`` records (a batch) has
    similar lengths: a random permutation cut into windows of ``LENGTH_GROUP_BATCHES`` batches,
    each sorted by length (as Hugging Face's ``LengthGroupedSampler``), then the batches
    shuffled, so training never sweeps from long records to short ones (which, measured on
    SST-2, costs a point or two of accuracy). Every batch is full but the last. With dynamic
    padding, a batch then holds little padding."""
    order = torch.randperm(len(lengths), generator=generator)
    window = batch_size * LENGTH_GROUP_BATCHES
    lengths = lengths.cpu()
    grouped = torch.cat(
        [
            chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
            for chunk in (order[i : i + window] for i in range(0, len(order), window))
        ]
    )
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    last = [batches.pop()] if len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return torch.cat(shuffled + last)


@dataclass
class LoopState:
    """Everything needed to continue a run exactly where an epoch ended."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    epochs_without_improvement: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, object] = field(default_factory=dict)
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_state: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. FitNets adapters
    generator_state: torch.Tensor | None = None


@dataclass
class LoopOutcome:
    state: LoopState
    stopped: bool
    early_stopped: bool = False


def make_optimizer(params: list[nn.Parameter], training: Training) -> torch.optim.Optimizer:
    """Fused kernels (CPU and CUDA): one kernel for all parameters instead of a Python loop,
    which is most of the step time for small students."""
    lr, wd = training.learning_rate, training.weight_decay
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=training.momentum, weight_decay=wd, fused=True
        )
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=True)


def learning_rate(training: Training, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The rate at an optimisation step, from the step alone (so a resumed run needs no state)."""
    base = training.learning_rate
    if training.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if training.schedule == "step":
        return base * training.step_gamma ** ((step // steps_per_epoch) // training.step_epochs)
    return base


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: Batch | torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    """The model's logits ``[N, classes]`` on every record of ``split`` (a tensor: the single
    input), in eval mode; text in batches of records of similar lengths (``TEXT_BATCH`` each),
    padded to their longest."""
    model.eval()
    lengths = None if isinstance(split, torch.Tensor) else split.lengths
    if lengths is None:
        x = split if isinstance(split, torch.Tensor) else split.x
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    order = torch.argsort(lengths.cpu(), stable=True).to(lengths.device)
    logits: torch.Tensor | None = None
    for i in range(0, len(order), TEXT_BATCH):
        rows = order[i : i + TEXT_BATCH]
        assert isinstance(split, Batch)
        output = model(*split[rows].inputs.values())
        if logits is None:
            logits = output.new_empty((len(order), output.shape[1]))
        logits[rows] = output
    assert logits is not None
    return logits


def train(
    student: nn.Module,
    loss_fn: nn.Module,
    train_split: Batch,
    val_split: Batch,
    training: Training,
    callbacks: Callbacks,
    *,
    resume: LoopState | None = None,
    autocast_dtype: torch.dtype | None = None,
    student_tap: FeatureTap | TransformerTap | None = None,
    teacher_tap: Callable[[Batch], list[torch.Tensor]] | None = None,
    augment: Callable[[Batch, int], tuple[Batch, Mix | None]] | None = None,
) -> LoopOutcome:
    """Minimise ``loss_fn(student_logits, teacher_logits, labels)``; with a ``student_tap``
    (feature methods), ``loss_fn(..., student_features, teacher_features)`` (and, for text, the
    batch's attention mask), training the loss's own parameters (adapters) with the student.
    Teacher features come with the batch, or from ``teacher_tap`` run on every batch (text:
    per-token outputs are too large to keep).

    ``augment(batch, global_step)`` (logit methods) replaces each training batch by an augmented
    one carrying the teacher's logits on it (online teaching: a teacher pass per step), and says
    how mixup or cutmix mixed it, if they did: the loss then takes the mixed labels
    (``mixed_label_loss``). Validation always sees the stored inputs."""
    device = train_split.labels.device
    parameters = [*student.parameters(), *loss_fn.parameters()]
    optimizer = make_optimizer(parameters, training)
    # The compiled module shares the student's parameters; state is read from `student` itself.
    forward: nn.Module = torch.compile(student) if training.compile else student  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(training.seed)
    state = resume or LoopState(best_state=copy.deepcopy(student.state_dict()))
    if resume is not None:
        student.load_state_dict(resume.model_state)
        loss_fn.load_state_dict(resume.loss_state)
        optimizer.load_state_dict(resume.optimizer_state)
        assert resume.generator_state is not None
        generator.set_state(resume.generator_state)

    n = len(train_split)
    steps_per_epoch = math.ceil(n / training.batch_size)
    total_steps = training.epochs * steps_per_epoch
    teacher_val = logit_metrics(
        val_split.teacher_logits, val_split.teacher_logits, val_split.labels
    )

    autocast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast(device.type, dtype=autocast_dtype)
    )
    patience = training.early_stopping_patience
    if patience is not None and state.epochs_without_improvement >= patience:
        return LoopOutcome(state, stopped=False, early_stopped=True)  # resumed after it stopped
    for epoch in range(state.epoch + 1, training.epochs + 1):
        student.train()
        started = time.perf_counter()
        # Batches by indexing one permutation of the in-memory tensors: no per-sample Python.
        lengths = train_split.lengths
        order = (
            torch.randperm(n, generator=generator)
            if lengths is None
            else length_grouped_order(lengths, training.batch_size, generator)
        ).to(device)
        totals: torch.Tensor | None = None
        term_names: list[str] = []
        for step in range(steps_per_epoch):
            if callbacks.should_stop():
                return LoopOutcome(state, stopped=True)
            global_step = (epoch - 1) * steps_per_epoch + step
            if training.schedule != "constant":
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(training, global_step, total_steps, steps_per_epoch)
            batch = train_split[
                order[step * training.batch_size : (step + 1) * training.batch_size]
            ]
            mix = None
            if augment is not None:
                batch, mix = augment(batch, global_step)
            with autocast:
                if student_tap is None:
                    logits, features = forward(*batch.inputs.values()), None
                else:
                    logits, features = student_tap(*batch.inputs.values(), model=forward)
                teacher_features = (
                    list(batch.teacher_features) if teacher_tap is None else teacher_tap(batch)
                )
            inputs: list[object] = [logits, batch.teacher_logits, batch.labels]
            if features is not None:
                inputs += [features, teacher_features]
                if ATTENTION_MASK in batch.inputs:
                    inputs.append(batch.inputs[ATTENTION_MASK])
            if mix is None:
                loss, terms = loss_fn(*inputs)
            else:
                if features is not None:
                    raise ValueError("mixed batches take logit methods only")
                loss, terms = mixed_label_loss(
                    loss_fn, logits, batch.teacher_logits, batch.labels, mix.labels, mix.lam
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if training.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(parameters, training.grad_clip_norm)
            optimizer.step()
            # Sum on the device, all terms in one tensor; .item() only once per epoch (a sync).
            step_values = torch.stack([loss.detach(), *terms.values()])
            totals = step_values if totals is None else totals + step_values
            term_names = ["loss", *terms]
            callbacks.progress((global_step + 1) / total_steps)

        seconds = time.perf_counter() - started
        val = logit_metrics(
            predict_logits(student, val_split), val_split.teacher_logits, val_split.labels
        )
        assert totals is not None
        means = (totals / steps_per_epoch).tolist()
        values = {f"train_{k}": v for k, v in zip(term_names, means, strict=True)}
        values |= {f"val_{k}": v for k, v in val.items()}
        values |= {
            "teacher_val_accuracy": teacher_val["accuracy"],
            "learning_rate": optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "samples_per_second": n / seconds,
        }
        state.epoch = epoch
        if val["accuracy"] > state.best_val_accuracy:
            state.best_epoch, state.best_val_accuracy = epoch, val["accuracy"]
            state.best_state = copy.deepcopy(student.state_dict())
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        state.model_state = student.state_dict()
        state.loss_state = loss_fn.state_dict()
        state.optimizer_state = optimizer.state_dict()
        state.generator_state = generator.get_state()
        callbacks.epoch_end(epoch, values)
        callbacks.save_checkpoint(state)
        if patience is not None and state.epochs_without_improvement >= patience:
            return LoopOutcome(state, stopped=False, early_stopped=True)
    return LoopOutcome(state, stopped=False)
