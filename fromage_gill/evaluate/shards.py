"""Evaluation on many processes: ``accelerate launch`` or ``torchrun`` start N copies of ``fromage-gill eval``; each
takes every N-th example (``Processes.shard``), writes its own results shard and resumes it, and rank 0 merges the
shards into the one ``metrics.json`` a single process writes.

Under either launcher accelerate's ``PartialState`` sets the ``torch.distributed`` process group up from the
environment (gloo on CPU processes, NCCL on GPUs) and names each process's device; ``devices.owned_process_group``
tears it down at the end. Without a launcher nothing is initialised and the run is one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..devices import owned_process_group

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world``, and the device a launcher gave it (None: one
    process, the ``--device`` flag decides)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """Every ``world``-th item from ``rank``: the shards are disjoint, cover ``items``, and differ in size by at
        most one."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. computes and caches the candidate embeddings), then the others (which
        find the cache): the work is done once, and every process gets the same numbers."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


ONE = Processes()


WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, MPIs


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch, mpirun) started more than one process."""
    return any(int(os.environ.get(name, "1")) > 1 for name in WORLD_SIZE_VARIABLES)


@contextlib.contextmanager
def eval_processes(*, cpu: bool = False) -> Iterator[Processes]:
    """The run's processes: one, or those a launcher started (the process group is created here and destroyed on
    the way out). ``cpu``: CPU processes (gloo) even where there are GPUs; without GPUs they always are (accelerate
    treats CPU processes as one process each unless told)."""
    if not launched():
        yield ONE
        return
    from accelerate import PartialState

    with owned_process_group():
        state = PartialState(cpu=cpu or not torch.cuda.is_available())
        device = torch.device(str(state.device))
        yield Processes(state.process_index, state.num_processes, device if device.type != "cpu" else None)
