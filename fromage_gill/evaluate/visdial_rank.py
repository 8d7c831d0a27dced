"""``visdial-rank``: VisDial answer ranking (FROMAGe's image-and-text-to-text evaluation): the 100 options of each
round ranked by the model's likelihood of them after the image and the dialogue so far; R@1/5/10/20, MRR and mean
rank over every round with a ground truth, NDCG against the dense annotations (one round per dialogue).

Two scorings (``--scoring``; docs/research.md shows both layouts):

- ``published`` (the default) reproduces fromage ``evals/eval_visdial_generation.py``: the image (squashed to the
  encoder's square size) then ``"Q: q1?\\nA: a1\\nQ: q2?\\nA: "`` tokenized with the tokenizer's special tokens
  (OPT: BOS first); each option tokenized on its own, also with them (so OPT's BOS comes between ``"A: "`` and the
  answer), and appended. An option's loss is the cross-entropy between each answer position's logits and that
  same position's token (no shift: the logits at a token are compared with the token itself, not the next one),
  summed over the answer's positions; the lowest loss ranks first. Every round of every dialogue is scored.
- ``next-token`` is the layout the model saw in training and in the chat: ``"...\\nA:"`` followed by the option
  with its leading space (``" it is red"``), BOS once before the text, scored by the summed next-token
  log-likelihood of the option's tokens (``probe.score_candidates``).

The published script indexes the dense round with ``round_id`` as if it were 0-based; VisDial's ``round_id`` is
1-based and is read as such here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..generate.prompt import TokenIds, VisionCache, encode_pieces, normalize_message
from ..probe import score_candidates
from .common import EvalOptions, limited, open_image
from .metrics import mean_reciprocal_rank, ndcg, rank_of, recall_at
from .readers import Dialog, ImageFolder, read_dense, read_visdial
from .report import EvalReport
from .shards import Processes
from .task import EvalTask, Plan
from .visdial_t2i import visdial_images

if TYPE_CHECKING:  # types only: the task runs on the model its caller loaded
    from ..pipeline import Pipeline


SCORINGS = ("published", "next-token")
KS = (1, 5, 10, 20)  # the published script's top-k


def round_context(dialog: Dialog, i: int, scoring: str = "published") -> str:
    """The dialogue up to round ``i``'s question, ending where the answer goes: ``"\\nA: "`` (published) or
    ``"\\nA:"`` (next-token, where the option brings its own leading space)."""
    lines = []
    for j, r in enumerate(dialog.rounds[: i + 1]):
        if j > 0:
            lines.append(f"A: {dialog.rounds[j - 1].answer}")
        lines.append(f"Q: {r.question}?")
    return "\n".join(lines) + ("\nA: " if scoring == "published" else "\nA:")


@torch.no_grad()
def published_scores(pipeline: Pipeline, image, context: str, options: list[str], *, batch_size: int) -> torch.Tensor:
    """(C,) minus each option's loss as the published script computes it (module docstring): higher is better."""
    m, tok = pipeline.model, pipeline.tokenizer
    pieces = normalize_message(
        [image, TokenIds(tuple(tok(context, add_special_tokens=True).input_ids))], name="context", allow_token_ids=True
    )
    ctx = encode_pieces(tok, pieces, pipeline.config.n_visual_tokens, bos=False)
    ctx_embeds = ctx.embed(m, VisionCache())  # (Tc, d), once for every option
    n = len(ctx)
    answers = tok(list(options), add_special_tokens=True).input_ids
    scores = []
    for lo in range(0, len(answers), batch_size):
        chunk = answers[lo : lo + batch_size]
        width = max(len(a) for a in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=m.device)
        mask = torch.zeros(len(chunk), n + width, dtype=torch.long, device=m.device)
        for i, a in enumerate(chunk):
            ids[i, : len(a)] = torch.tensor(a)
            mask[i, : n + len(a)] = 1
        x = torch.cat([ctx_embeds[None].expand(len(chunk), -1, -1), m.embed_tokens(ids)], dim=1)  # (B, Tc + W, d)
        hidden = m.forward_lm(x, mask, logits="none").hidden[:, n:]  # (B, W, d): the answer's own positions
        logp = F.log_softmax(m.logits(hidden), dim=-1)  # (B, W, V)
        picked = logp.gather(-1, ids.to(logp.device)[..., None])[..., 0]  # the position's own token: no shift
        scores.append(picked.masked_fill(~mask[:, n:].to(picked.device).bool(), 0).sum(-1).cpu())
    return torch.cat(scores)


def option_scores(pipeline: Pipeline, image, dialog: Dialog, i: int, scoring: str, batch_size: int) -> torch.Tensor:
    """(C,) the scores of round ``i``'s options under ``scoring``; higher ranks first."""
    options = list(dialog.rounds[i].options)
    context = round_context(dialog, i, scoring)
    if scoring == "published":
        return published_scores(pipeline, image, context, options, batch_size=batch_size)
    return score_candidates(pipeline, [image, context], [" " + o for o in options], batch_size=batch_size).summed


class VisdialRank(EvalTask["Pipeline", Dialog]):
    name = "visdial-rank"
    help = "VisDial answer ranking: R@1/5/10, MRR, NDCG (--scoring published, the default, or next-token)"

    def read(self, opts: EvalOptions) -> tuple[list[Dialog], dict, ImageFolder, list[Dialog], int]:
        dialogs = limited(read_visdial(opts.data), opts.limit)
        dense = read_dense(opts.dense) if opts.dense is not None else {}
        return (dialogs, dense, *visdial_images(opts, dialogs))

    def id_of(self, example: Dialog) -> str:
        return str(example.image_id)

    def batch_size(self, opts: EvalOptions) -> int:
        return 1  # a dialogue at a time; --batch-size is the number of options per forward

    def plan(self, pipeline: Pipeline, data, opts: EvalOptions, processes: Processes) -> Plan:
        dialogs, dense, folder, found, missing = data
        key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data), "scoring": opts.scoring}
        return Plan(found, key, {"dialogs": dialogs, "dense": dense, "folder": folder, "missing": missing})

    def run_batch(self, pipeline: Pipeline, plan: Plan, batch: list[Dialog], opts: EvalOptions) -> list[dict]:
        records = []
        for d in batch:
            try:
                image = open_image(plan.fields["folder"].find(d.image_id), squash_to=pipeline.image_processor.size)
            except (ValueError, OSError):
                records.append({"id": d.image_id, "unreadable": True, "rounds": []})
                continue
            rounds = []
            for i, r in enumerate(d.rounds):
                if r.gt_index is None or len(r.options) < 2 or any(d.rounds[j].answer is None for j in range(i)):
                    continue  # the test split withholds answers: nothing to rank against
                scores = option_scores(pipeline, image, d, i, opts.scoring, opts.batch_size)
                rounds.append(
                    {
                        "round": i + 1,
                        "rank": rank_of(scores, r.gt_index),
                        "scores": [round(float(x), 5) for x in scores],
                    }
                )
            records.append({"id": d.image_id, "rounds": rounds})
        return records

    def report(
        self, pipeline: Pipeline, plan: Plan, done: list[dict], opts: EvalOptions, model_name: str
    ) -> EvalReport:
        dense = plan.fields["dense"]
        unreadable = sum(bool(r.get("unreadable")) for r in done)
        done = [r for r in done if not r.get("unreadable")]
        ranks = [x["rank"] for r in done for x in r["rounds"]]
        row = {**recall_at(ranks, KS), "MRR": 100.0 * mean_reciprocal_rank(ranks), "mean rank": _mean(ranks)}
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
            row["NDCG"] = 100.0 * sum(ndcgs) / len(ndcgs)
        else:
            notes.append(
                "NDCG not computed: pass the dense annotations with --dense" if not dense else "no dense round scored"
            )
        counts = {
            "dialogues": len(plan.fields["dialogs"]),
            "evaluated": len(done),
            "rounds": len(ranks),
            "rounds with dense annotations": len(ndcgs),
            "skipped (image missing from the folder)": plan.fields["missing"],
            "skipped (image does not open)": unreadable,
        }
        return EvalReport(self.name, model_name, {f"{opts.scoring} scoring": row}, counts, notes)


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
