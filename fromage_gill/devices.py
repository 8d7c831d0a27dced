"""Devices and dtypes: the defaults every loader uses, and where a (possibly offloaded) module computes."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@overload
def parse_dtype(dtype: str | torch.dtype) -> torch.dtype: ...
@overload
def parse_dtype(dtype: None) -> None: ...
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its weights', or accelerate's execution device when it offloads them."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(module.parameters()).device
