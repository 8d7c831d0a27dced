"""Running one training on many processes: the accelerator a ``train()`` call runs under (and what it tears down),
DDP's view of the frozen backbones, and gathering rows across ranks.

Under ``torchrun`` or ``accelerate launch`` accelerate's first ``Accelerator`` (its ``PartialState``) initialises the
``torch.distributed`` process group from the environment. ``training_accelerator`` destroys that group on the way
out when it was created there: left alive, gloo's threads are still running at interpreter exit and take the process
down ("terminate called without an active exception", SIGABRT) about one run in three on a 2-core machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator


@contextlib.contextmanager
def training_accelerator(*, cpu: bool, precision: str) -> Iterator[Accelerator]:
    """An ``accelerate.Accelerator`` for one training run (``precision``: fp32, bf16 or fp16 autocast), whose process
    group, if this call created it, is destroyed when the run ends, normally or not. A group that already existed
    is left to its owner: a caller that needs torch.distributed after training sets it up before."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, KwargsHandler

    had_group = _process_group_exists()
    mixed = {"fp32": "no"}.get(precision, precision)
    handlers: list[KwargsHandler] = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    try:
        try:
            accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers)
        except ValueError:  # an earlier run in this process fixed another precision: that part of the state resets
            AcceleratorState._reset_state()
            accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers)
        yield accelerator
    finally:
        if not had_group and _process_group_exists():
            # accelerate's shared state is kept: a later Accelerator in this process then fails on its first
            # collective with a clear error. Letting it set the group up again from the environment could hang:
            # torch names the new default group like the old one, whose keys are still in torchrun's store.
            torch.distributed.destroy_process_group()


def _process_group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ignore_frozen_backbones(module: nn.Module) -> None:
    """Tell DDP not to broadcast or watch the frozen LM and vision encoder of ``module`` (an ``Objective``): they are
    identical on every process by construction."""

    def frozen(name: str) -> bool:
        return name.split(".")[1] in ("lm", "vision")  # model.lm.*, model.vision.*

    names = [n for n, _ in module.named_parameters() if frozen(n)]
    names += [n for n, _ in module.named_buffers() if frozen(n)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def gather_with_grad(x: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' rows in rank order, this process's part keeping its gradient (the others are constants):
    the contrastive loss then sees every process's negatives, as in the published code. Ranks may hold
    different numbers of rows (unreadable images are dropped)."""
    if accelerator.num_processes == 1:
        return x
    parts = _gather_parts(x.detach(), accelerator)
    parts[accelerator.process_index] = x
    return torch.cat(parts)


def gather_varlen(x: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' rows in rank order, without gradient; ranks may hold different numbers of rows."""
    if accelerator.num_processes == 1:
        return x
    return torch.cat(_gather_parts(x.detach(), accelerator))


def _gather_parts(x: torch.Tensor, accelerator) -> list[torch.Tensor]:
    sizes = accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    pad = torch.zeros((max(sizes) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    every = accelerator.gather(torch.cat([x, pad])).view(len(sizes), max(sizes), *x.shape[1:])
    return [every[r, :n] for r, n in enumerate(sizes)]
