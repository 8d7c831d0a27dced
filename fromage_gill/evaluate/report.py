"""What an evaluation run leaves behind: a resumable per-example JSONL, a metrics JSON, and a table of the run's
figures beside the papers'.

``Results`` appends one JSON line per finished example (flushed at once); a rerun with the same ``--out`` reads
them back and skips those examples. A half-written last line (the run was killed mid-write) is dropped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..typed_json import JSONValue
from .papers import PAPERS

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.json"


class Results:
    """Per-example results of one task in ``out/results.jsonl``, by example id."""

    def __init__(self, out: str | Path, task: str, run_key: Mapping[str, JSONValue]):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS_FILE
        self.records: dict[str, dict] = {}
        header = {"task": task, **run_key}
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            try:
                first = json.loads(lines[0]) if lines else None
            except json.JSONDecodeError:
                first = None
            if first is not None and first.get("header") != header:
                raise ValueError(
                    f"{self.path} holds results of another run ({first.get('header')}); this run is {header}: "
                    f"pass another --out, or delete the file to start over"
                )
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: dropping a half-written line (the last run stopped mid-write)", self.path)
                    continue
                self.records[str(rec["id"])] = rec
            self._rewrite(header)
            if self.records:
                logger.info("resuming: %d example(s) already done in %s", len(self.records), self.path)
        else:
            self._rewrite(header)

    def _rewrite(self, header: dict) -> None:
        lines = [json.dumps({"header": header})] + [json.dumps(r) for r in self.records.values()]
        self.path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def __contains__(self, example_id: object) -> bool:
        return str(example_id) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: dict) -> None:
        record = {**record, "id": str(record["id"])}
        self.records[record["id"]] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records.values())


@dataclass
class EvalReport:
    """One run's figures: ``metrics[setting][name]`` (percent for R@k and caption metrics, as the papers print)."""

    task: str
    model: str
    metrics: dict[str, dict[str, float]]
    counts: dict[str, int] = field(default_factory=dict)  # examples evaluated, skipped (and why), candidates
    notes: list[str] = field(default_factory=list)  # metrics that did not run and why, protocol remarks
    paper: str | None = None  # which paper row(s) the table shows beside the run (papers.PAPERS key)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["paper_figures"] = PAPERS.get(self.paper or self.task, {})
        return out

    def save(self, out: str | Path) -> Path:
        path = Path(out) / METRICS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """The run's rows and the papers' rows under the same columns."""
        papers = PAPERS.get(self.paper or self.task, {})
        rows: list[tuple[str, Mapping[str, float | None]]] = []
        for setting, values in self.metrics.items():
            rows.append((f"this run: {setting}" if setting else "this run", values))
        for name, values in papers.items():
            rows.append((name, values))
        columns = _columns(v for _, v in rows)
        width = max([len(r[0]) for r in rows] + [10])
        lines = [f"{self.task} ({self.model})", f"{'':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
        for name, values in rows:
            lines.append(f"{name:<{width}}  " + "  ".join(_cell(values.get(c)) for c in columns))
        if self.counts:
            lines.append("examples: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _columns(rows: Iterable[Mapping[str, JSONValue]]) -> list[str]:
    seen: list[str] = []
    for values in rows:
        seen += [k for k in values if k not in seen]
    return seen


def _cell(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>8}"
    return f"{v:>8.2f}" if abs(v) < 1000 else f"{v:>8.0f}"
