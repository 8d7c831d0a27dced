"""``visdial-t2i``: VisDial text-to-image retrieval (FROMAGe Table 2), R@1/5/10 over the split's images.

Protocol of the published script (fromage ``evals/eval_visdial_retrieval.py``): the query is the whole dialogue,
``"Q: <question>? A: <answer>. Q: ..."`` (rounds joined by spaces), BOS first and the image tokens last; the
candidates are the dialogues' own images (2,064 for val), squashed to the encoder's square size as the script
does. A dialogue whose image is missing or does not open is skipped and counted. The published script ranks the
score matrix along its text axis (for each image, the dialogues); ``i2t R@k`` reports that orientation too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..probe import embed_prompts
from .common import EvalOptions, candidate_embeddings, limited
from .metrics import rank_of, recall_at
from .readers import DataError, Dialog, ImageFolder, read_visdial
from .report import EvalReport
from .shards import Processes
from .task import EvalTask, Plan

if TYPE_CHECKING:  # types only: the task runs on the model its caller loaded
    from ..pipeline import Pipeline


def dialogue_text(dialog: Dialog) -> str:
    parts = []
    for r in dialog.rounds:
        parts.append(f"Q: {r.question}?")
        if r.answer is not None:
            parts.append(f"A: {r.answer}.")
    return " ".join(parts)


def visdial_images(opts: EvalOptions, dialogs: list[Dialog]) -> tuple[ImageFolder, list[Dialog], int]:
    """The folder, the dialogues whose image file is there, and how many were missing."""
    folder = ImageFolder(opts.need_images("VisualDialog_val2018_000000185565.jpg"))
    folder.require_some("VisDial images", "VisualDialog_val2018_000000185565.jpg")
    found = [d for d in dialogs if folder.find(d.image_id) is not None]
    if not found:
        raise DataError(
            f"none of the {len(dialogs)} dialogues' images is in {folder.root} (e.g. image_id {dialogs[0].image_id}); "
            f"expected files like VisualDialog_val2018_{dialogs[0].image_id:012d}.jpg"
        )
    return folder, found, len(dialogs) - len(found)


class VisdialT2I(EvalTask["Pipeline", Dialog]):
    name = "visdial-t2i"
    help = "VisDial text-to-image retrieval, R@1/5/10"

    def read(self, opts: EvalOptions) -> tuple[list[Dialog], ImageFolder, list[Dialog], int]:
        dialogs = limited(read_visdial(opts.data), opts.limit)
        return (dialogs, *visdial_images(opts, dialogs))

    def id_of(self, example: Dialog) -> str:
        return str(example.image_id)

    def plan(self, pipeline: Pipeline, data, opts: EvalOptions, processes: Processes) -> Plan:
        dialogs, folder, found, missing = data
        with processes.main_first():  # rank 0 embeds the candidates once; the others read its cache
            ok, matrix, unreadable = candidate_embeddings(
                pipeline,
                [str(d.image_id) for d in found],
                [folder.find(d.image_id) for d in found],
                opts.out,
                batch_size=opts.batch_size,
                squash_to=pipeline.image_processor.size,
                show_progress=opts.progress and processes.is_main,
            )
        position = {image_id: k for k, image_id in enumerate(ok)}
        usable = [d for d in found if str(d.image_id) in position]
        key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data)}
        fields = {"dialogs": dialogs, "missing": missing, "unreadable": unreadable, "ok": ok}
        return Plan(usable, key, {**fields, "matrix": matrix, "position": position})

    def run_batch(self, pipeline: Pipeline, plan: Plan, batch: list[Dialog], opts: EvalOptions) -> list[dict]:
        matrix, position, ok = plan.fields["matrix"], plan.fields["position"], plan.fields["ok"]
        query = embed_prompts(pipeline, [dialogue_text(d) for d in batch], batch_size=opts.batch_size)
        scores = query.embeddings @ matrix.T
        records = []
        for b, d in enumerate(batch):
            top = torch.argsort(scores[b], descending=True, stable=True)[:10]
            records.append(
                {
                    "id": d.image_id,
                    "rank": rank_of(scores[b], position[str(d.image_id)]),
                    "top": [ok[int(k)] for k in top],
                    "query": [round(float(x), 7) for x in query.embeddings[b]],
                }
            )
        return records

    def report(
        self, pipeline: Pipeline, plan: Plan, done: list[dict], opts: EvalOptions, model_name: str
    ) -> EvalReport:
        f = plan.fields
        metrics = {"t2i": recall_at([r["rank"] for r in done])}
        if done:  # the published orientation: for each image, the rank of its dialogue among all dialogues
            queries = torch.tensor([r["query"] for r in done])
            images = f["matrix"][[f["position"][r["id"]] for r in done]]
            by_image = images @ queries.T  # (N, N)
            metrics["i2t (published script's axis)"] = recall_at([rank_of(by_image[i], i) for i in range(len(done))])
        counts = {
            "dialogues": len(f["dialogs"]),
            "evaluated": len(done),
            "skipped (image missing from the folder)": f["missing"],
            "skipped (image does not open)": len(f["unreadable"]),
            "candidate images": len(f["ok"]),
        }
        notes = [f"--limit {opts.limit}: candidates are those dialogues' images only"] if opts.limit else []
        return EvalReport(self.name, model_name, metrics, counts, notes)
