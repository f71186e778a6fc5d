"""The compute dtype a `--dtype` names, for training and for evaluation alike."""

from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # float64: exact comparisons


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device):
    """`auto` is bfloat16 on a GPU and float32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
