"""What the answer-scoring layout does to VisDial answer ranking, measured with ``fromage-gill eval visdial-rank``
on the shipped toy models: a VisDial v1.0 file written from the toy world (held-out one-shape drawings, two rounds
each: "What colour is the shape?" and "What shape is this?", 12 options: the six colour answers and the six shape
answers, worded as the toy dialogues word them), scored with ``--scoring published`` (the authors' script) and
``--scoring next-token`` (the layout the model read in training).

    python benchmarks/bench_visdial_scoring.py [--model toy-gill] [--n 36] [--out /tmp/visdial-scoring]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fromage_gill.toy import world as W  # noqa: E402


def write_toy_visdial(root: Path, n: int) -> tuple[Path, Path]:
    scenes = [s for s in W.distinct_scenes(4 * n, split="test", seed=0) if len(s.things) == 1][:n]
    folder = root / "VisualDialog_val2018"
    folder.mkdir(parents=True, exist_ok=True)
    questions = ["What colour is the shape", "What shape is this"]
    answers = [f"it is {c}." for c in W.COLOURS] + [f"it is a {s}." for s in W.SHAPES]
    dialogs = []
    for k, scene in enumerate(scenes):
        image_id = 1 + k
        scene.render().save(folder / f"VisualDialog_val2018_{image_id:012d}.png")
        truth = [list(W.COLOURS).index(scene.things[0].colour), len(W.COLOURS) + W.SHAPES.index(scene.things[0].shape)]
        options = list(range(len(answers)))
        rounds = [
            {"question": q, "answer": t, "answer_options": options, "gt_index": t}
            for q, t in zip((0, 1), truth, strict=True)
        ]
        dialogs.append({"image_id": image_id, "caption": scene.caption, "dialog": rounds})
    data = root / "visdial_toy.json"
    data.write_text(json.dumps({"data": {"questions": questions, "answers": answers, "dialogs": dialogs}}))
    return data, folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-gill")
    p.add_argument("--n", type=int, default=36, help="drawings (dialogues)")
    p.add_argument("--out", type=Path, default=Path("/tmp/visdial-scoring"))
    args = p.parse_args()
    from fromage_gill.cli import main as cli

    data, images = write_toy_visdial(args.out, args.n)
    rows = {}
    for scoring in ("published", "next-token"):
        out = args.out / f"{args.model}-{scoring}"
        argv = ["eval", "visdial-rank", "--model", args.model, "--device", "cpu", "--dtype", "fp32", "--no-progress"]
        cli([*argv, "--data", str(data), "--images", str(images), "--out", str(out), "--scoring", scoring])
        rows[scoring] = json.loads((out / "metrics.json").read_text())["metrics"][f"{scoring} scoring"]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
