import torch

Terms = dict[str, torch.Tensor]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision logits lose the softmax tail; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
