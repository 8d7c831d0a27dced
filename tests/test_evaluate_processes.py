"""``fromage-gill eval`` on two CPU processes (torchrun, gloo): each takes every other example and writes its own
results shard; rank 0 merges them into the metrics.json one process writes, value for value. A later run resumes
from the shards, whatever its process count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_evaluate_captioning import write_karpathy
from test_evaluate_visdial import write_visdial
from test_evaluate_vist import write_vist

from fromage_gill.cli import main
from fromage_gill.evaluate.readers import read_captions

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "fromage_gill.cli", *argv]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vist-retrieval", "visdial-rank"])
def test_two_processes_give_the_metrics_of_one_and_resume_from_the_shards(task, tmp_path, capsys):
    if task == "vist-retrieval":
        data, images = write_vist(tmp_path, n_stories=5)
        extra = []
    else:
        data, images, dense = write_visdial(tmp_path, n=5)
        extra = ["--dense", str(dense)]
    base = ["eval", task, "--model", "tiny-fromage", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    base += ["--data", str(data), "--images", str(images), "--batch-size", "2", *extra]

    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    stdout = torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    assert stdout.count("this run") >= 1 and stdout.count(f"{task} (tiny-fromage)") == 1  # rank 0 prints, once

    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")
    shards = [records(tmp_path / "two" / f"results.rank{r}-of-2.jsonl") for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 2]  # every other example: disjoint, and together all five
    ids = [r["id"] for r in records(tmp_path / "one" / "results.jsonl")]
    assert [r["id"] for r in shards[0]] == ids[0::2] and [r["id"] for r in shards[1]] == ids[1::2]

    # Resume: drop rank 1's last example; one process then does that one only, and the figures do not move.
    shard = tmp_path / "two" / "results.rank1-of-2.jsonl"
    shard.write_text("\n".join(shard.read_text().splitlines()[:-1]) + "\n")
    assert main([*base, "--out", str(tmp_path / "two")]) == 0
    assert [r["id"] for r in records(tmp_path / "two" / "results.jsonl")] == [ids[3]]
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")


def test_the_benchmark_docs_evaluation_md_adds_runs_as_written(tiny_gill, tmp_path):
    import re

    import fromage_gill as fg
    from fromage_gill.evaluate import TASKS, EvalOptions, evaluate
    from fromage_gill.evaluate.metrics import rank_of

    doc = (ROOT / "docs" / "evaluation.md").read_text()
    section = doc[doc.index("## Adding a benchmark") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "docs/evaluation.md", "exec"), {"__name__": "coco_t2i"})
        assert "coco-t2i" in TASKS
        data, images = write_karpathy(tmp_path, splits=("test", "test", "test"))
        opts = EvalOptions(data=data, images=images, out=tmp_path / "o", batch_size=2, progress=False)
        report = evaluate("coco-t2i", tiny_gill, opts, model_name="tiny-gill")
    finally:
        TASKS.pop("coco-t2i", None)
    items = read_captions(data, "test")
    photos = [Image.open(images / it.file).convert("RGB") for it in items]
    scores = fg.embed_texts(tiny_gill, [it.references[0] for it in items]).scores(fg.embed_images(tiny_gill, photos))
    ranks = [rank_of(scores[i], i) for i in range(len(items))]
    assert report.metrics["t2i"]["R@1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / len(ranks))
    assert [
        json.loads(line)["rank"] for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()[1:]
    ] == ranks
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"] == report.metrics


def test_shards_written_one_after_the_other_merge_into_the_metrics_of_one_process(tiny_gill, tmp_path, monkeypatch):
    """The merge without a launcher: rank 1 of 2 runs first (its shard only, no report), then rank 0 (its shard,
    then the merged report); barriers are no-ops as the two never run at once."""
    from fromage_gill.evaluate import EvalOptions, Processes, evaluate

    monkeypatch.setattr(Processes, "barrier", lambda self: None)
    data, images, dense = write_visdial(tmp_path, n=3)

    def opts(out: str) -> EvalOptions:
        return EvalOptions(data=data, images=images, out=tmp_path / out, dense=dense, progress=False)

    one = evaluate("visdial-rank", tiny_gill, opts("one"), model_name="tiny-gill")
    assert evaluate("visdial-rank", tiny_gill, opts("two"), model_name="tiny-gill", processes=Processes(1, 2)) is None
    assert not (tmp_path / "two" / "metrics.json").exists()
    merged = evaluate("visdial-rank", tiny_gill, opts("two"), model_name="tiny-gill", processes=Processes(0, 2))
    assert merged.metrics == one.metrics and merged.counts == one.counts
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")
    assert [len(records(tmp_path / "two" / f"results.rank{r}-of-2.jsonl")) for r in (0, 1)] == [2, 1]
