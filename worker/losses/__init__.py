"""Distillation losses, keyed by the name a job spec uses."""

from worker.losses.kd import KDLoss

LOSSES = {"kd": KDLoss}

__all__ = ["LOSSES", "KDLoss"]
