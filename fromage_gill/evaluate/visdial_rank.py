"""``visdial-rank``: VisDial answer ranking (FROMAGe's image-and-text-to-text evaluation): the 100 options of each
round ranked by their summed log-likelihood; R@1/5/10, MRR and mean rank over every round with a ground truth,
NDCG against the dense annotations (one round per dialogue).

Context, as the published notebook lays it out: the image (squashed to the encoder's square size), then
``"Q: q1?\\nA: a1\\nQ: q2?\\nA: "`` (BOS before the text); each option is tokenized on its own and appended
(``probe.score_candidates``). Differences from the notebook, on purpose: the notebook's loss compares each
position's logits with its own token (no shift) and includes a second BOS before the option; this is the
next-token log-likelihood of the option's tokens. The notebook also indexes the dense round with ``round_id`` as
if it were 0-based; VisDial's ``round_id`` is 1-based, and it is read as such here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..probe import score_candidates
from .common import EvalOptions, limited, open_image, progress
from .metrics import mean_reciprocal_rank, ndcg, rank_of, recall_at
from .readers import Dialog, read_dense, read_visdial
from .report import EvalReport, Results
from .visdial_t2i import visdial_images

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def round_context(dialog: Dialog, i: int) -> str:
    lines = []
    for j, r in enumerate(dialog.rounds[: i + 1]):
        if j > 0:
            lines.append(f"A: {dialog.rounds[j - 1].answer}")
        lines.append(f"Q: {r.question}?")
    return "\n".join(lines) + "\nA: "


def run(pipeline: Pipeline, opts: EvalOptions, *, model_name: str) -> EvalReport:
    dialogs = limited(read_visdial(opts.data), opts.limit)
    dense = read_dense(opts.dense) if opts.dense is not None else {}
    folder, found, missing = visdial_images(opts, dialogs)
    results = Results(
        opts.out, "visdial-rank", {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data)}
    )
    size = pipeline.image_processor.size
    unreadable = 0
    todo = [d for d in found if d.image_id not in results]
    for d in progress(todo, len(todo), "visdial-rank", opts.progress):
        try:
            image = open_image(folder.find(d.image_id), squash_to=size)
        except (ValueError, OSError):
            unreadable += 1
            continue
        rounds = []
        for i, r in enumerate(d.rounds):
            if r.gt_index is None or len(r.options) < 2 or any(d.rounds[j].answer is None for j in range(i)):
                continue  # the test split withholds answers: nothing to rank against
            scores = score_candidates(
                pipeline, [image, round_context(d, i)], list(r.options), batch_size=opts.batch_size
            )
            rounds.append(
                {
                    "round": i + 1,
                    "rank": rank_of(scores.summed, r.gt_index),
                    "scores": [round(float(x), 5) for x in scores.summed],
                }
            )
        results.add({"id": d.image_id, "rounds": rounds})
    done = [r for r in results if int(r["id"]) in {d.image_id for d in found}]
    ranks = [x["rank"] for r in done for x in r["rounds"]]
    metrics = {"": {**recall_at(ranks), "MRR": 100.0 * mean_reciprocal_rank(ranks), "mean rank": _mean(ranks)}}
    ndcgs = []
    for r in done:
        if int(r["id"]) in dense:
            round_index, relevance = dense[int(r["id"])]
            hit = next((x for x in r["rounds"] if x["round"] == round_index + 1), None)
            if hit is not None:
                ndcgs.append(ndcg(torch.tensor(hit["scores"]), torch.tensor(relevance)))
    ndcgs = [x for x in ndcgs if not math.isnan(x)]
    notes = []
    if ndcgs:
        metrics[""]["NDCG"] = 100.0 * sum(ndcgs) / len(ndcgs)
    else:
        notes.append(
            "NDCG not computed: pass the dense annotations with --dense" if not dense else "no dense round scored"
        )
    counts = {
        "dialogues": len(dialogs),
        "evaluated": len(done),
        "rounds": len(ranks),
        "rounds with dense annotations": len(ndcgs),
        "skipped (image missing from the folder)": missing,
        "skipped (image does not open)": unreadable,
    }
    return EvalReport("visdial-rank", model_name, metrics, counts, notes)


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
