"""Devices and dtypes: the defaults every loader uses, where a (possibly offloaded) module computes, and the
``torch.distributed`` process group of a run on many processes (training, evaluation)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
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


def process_group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def owned_process_group() -> Generator[None, None, None]:
    """Destroy, on the way out, the ``torch.distributed`` process group created inside the block (accelerate's first
    ``PartialState`` creates it from the ``torchrun`` / ``accelerate launch`` environment). Left alive, gloo's threads
    are still running at interpreter exit and take the process down ("terminate called without an active
    exception", SIGABRT) about one run in three on a 2-core machine. A group that existed before is its owner's."""
    had_group = process_group_exists()
    try:
        yield
    finally:
        if not had_group and process_group_exists():
            # accelerate's shared state is kept: a later Accelerator in this process then fails on its first
            # collective with a clear error. Letting it set the group up again from the environment could hang:
            # torch names the new default group like the old one, whose keys are still in torchrun's store.
            torch.distributed.destroy_process_group()
