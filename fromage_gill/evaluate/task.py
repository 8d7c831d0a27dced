"""What an evaluation task is, and the one loop that runs every task on one or many processes.

A task is an ``EvalTask`` subclass in a file of its own (docs/evaluation.md adds one):

    read(opts)                          parse and check the data files: runs before the model loads, so a
                                        malformed file is an error in seconds
    plan(model, data, opts, **extra)    the examples (anything with an id), the run key a resumed run must match,
                                        and what the examples share (e.g. candidate image embeddings)
    run_batch(model, plan, batch, opts) one record (a JSON-able dict with an "id") per example of the batch
    report(model, plan, records, opts)  the metrics of the finished records (in the examples' order)
    name, help, needs, paper            the CLI name, one line of help, what the model must be ("pipeline": a
                                        FROMAGe/GILL Pipeline, "gill": one that generates, "magic": a MagicModel),
                                        and the papers' figures printed beside the run

``run_task`` does the rest for every task: it shards the examples over the processes, skips those already in the
results files (resume), batches the others, appends each record as it finishes, and on rank 0 merges every shard
and writes ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..typed_json import JSONValue
from .common import EvalOptions, batched, progress
from .report import EvalReport, Results
from .shards import ONE, Processes

if TYPE_CHECKING:  # types only: evaluation loads its model through the CLI or the caller
    from ..magic.model import MagicModel
    from ..pipeline import Pipeline

# What a task runs on: a FROMAGe/GILL Pipeline, or a MagicModel (captioning); each task names its own.
M = TypeVar("M", bound="Pipeline | MagicModel")
E = TypeVar("E")  # a task's example (a Story, a Dialog, ...)


@dataclass
class Plan(Generic[E]):
    """The examples of one run (``id_of`` names each one), the key a resumed run must match, and anything the
    task's batches share (subclass it: ``fields``)."""

    examples: Sequence[E]
    key: Mapping[str, JSONValue]
    fields: dict[str, Any] = field(default_factory=dict)  # each task's own shared values


class EvalTask(Generic[M, E]):
    """One benchmark. Subclasses set the class attributes and implement ``read``, ``plan``, ``run_batch`` and
    ``report``; ``register`` adds one to ``TASKS``, the CLI's list."""

    name: ClassVar[str]
    help: ClassVar[str]
    needs: ClassVar[str] = "pipeline"
    # The papers' rows printed beside a run, {row name: {metric: value}}; the built-in tasks' are in papers.py.
    paper: ClassVar[dict[str, dict[str, float]]] = {}

    def read(self, opts: EvalOptions, /) -> object:
        raise NotImplementedError

    def plan(self, model: M, data: Any, opts: EvalOptions, processes: Processes, /) -> Plan[E]:
        """(A task may take keyword arguments after these: ``evaluate(..., **extra)`` passes them on.)"""
        raise NotImplementedError

    def id_of(self, example: E, /) -> str:
        """The example's ``id`` (a task whose examples name it otherwise overrides this)."""
        return str(getattr(example, "id"))  # noqa: B009 (E is any type: the attribute is looked up at run time)

    def batch_size(self, opts: EvalOptions, /) -> int:
        """Examples per ``run_batch`` call (default ``--batch-size``)."""
        return opts.batch_size

    def run_batch(self, model: M, plan: Plan[E], batch: list[E], opts: EvalOptions, /) -> list[dict]:
        raise NotImplementedError

    def report(self, model: M, plan: Plan[E], records: list[dict], opts: EvalOptions, model_name: str, /) -> EvalReport:
        raise NotImplementedError


# A task of either model kind (EvalTask[Pipeline] or EvalTask[MagicModel]), as the registry holds them: no one type
# argument covers both, since a task's model is an argument; ``needs`` says which one a task takes (the CLI loads it).
AnyTask = EvalTask[Any, Any]


def run_task(
    task: EvalTask[M, E],
    model: M,
    opts: EvalOptions,
    *,
    model_name: str,
    data: object = None,
    processes: Processes = ONE,
    **extra,
) -> EvalReport | None:
    """Run ``task`` on this process's shard of the examples; on rank 0, merge every shard and write
    ``opts.out/metrics.json``. Returns the report on rank 0, None on the others."""
    data = task.read(opts) if data is None else data
    plan = task.plan(model, data, opts, processes, **extra)  # a task's own keywords after the four
    results = Results(opts.out, task.name, plan.key, processes)
    processes.barrier()  # every shard file is rewritten before any process reads the others (resume)
    results.reload()
    todo = [e for e in processes.shard(plan.examples) if task.id_of(e) not in results]
    size = task.batch_size(opts)
    desc = task.name if processes.world == 1 else f"{task.name} [{processes.rank}/{processes.world}]"
    for batch in progress(batched(todo, size), -(-len(todo) // size), desc, opts.progress):
        for record in task.run_batch(model, plan, batch, opts):
            results.add(record)
    processes.barrier()
    if not processes.is_main:
        return None
    results.reload()
    records = [r for r in (results.get(task.id_of(e)) for e in plan.examples) if r is not None]
    report = task.report(model, plan, records, opts, model_name)
    if report.figures is None and task.paper:
        report.figures = task.paper
    report.save(opts.out)
    return report
