"""Epoch checkpoints of a running job, so a job delivered again after a crash resumes.

Written as safetensors (tensors) plus JSON metadata: nothing is pickled, even for our own files.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from worker.training.loop import LoopState

FORMAT_VERSION = "1"


def _flatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(state: LoopState, path: Path) -> None:
    """Write atomically (temporary file, then rename): a crash mid-write keeps the last one."""
    optimizer_state = state.optimizer_state
    optimizer_tensors = {
        f"{index}.{name}": value
        for index, slots in optimizer_state["state"].items()  # type: ignore[attr-defined]
        for name, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    assert state.generator_state is not None
    tensors = {
        **_flatten("model", state.model_state),
        **_flatten("best", state.best_state),
        **_flatten("loss", state.loss_state),
        **_flatten("optimizer", optimizer_tensors),
        "generator": state.generator_state.contiguous(),
    }
    metadata = {
        "format_version": FORMAT_VERSION,
        "epoch": str(state.epoch),
        "best_epoch": str(state.best_epoch),
        "best_val_accuracy": repr(state.best_val_accuracy),
        "epochs_without_improvement": str(state.epochs_without_improvement),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def load_checkpoint(path: Path) -> LoopState | None:
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _unflatten("optimizer", tensors).items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    return LoopState(
        epoch=int(metadata["epoch"]),
        best_epoch=int(metadata["best_epoch"]),
        best_val_accuracy=float(metadata["best_val_accuracy"]),
        epochs_without_improvement=int(metadata["epochs_without_improvement"]),
        best_state=_unflatten("best", tensors),
        model_state=_unflatten("model", tensors),
        loss_state=_unflatten("loss", tensors),
        optimizer_state={"state": slots, "param_groups": json.loads(metadata["param_groups"])},
        generator_state=tensors["generator"],
    )
