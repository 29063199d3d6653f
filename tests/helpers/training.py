"""Training-loop callbacks that record what the loop reports."""

import copy

from worker.training.loop import LoopState


class Recorder:
    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[LoopState] = []

    def progress(self, fraction: float) -> None:
        assert 0.0 < fraction <= 1.0

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.epochs.append((epoch, values))

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, state: LoopState) -> None:
        self.checkpoints.append(copy.deepcopy(state))
