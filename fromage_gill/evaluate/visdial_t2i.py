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
from .common import EvalOptions, batched, candidate_embeddings, limited, progress
from .metrics import rank_of, recall_at
from .readers import DataError, Dialog, ImageFolder, read_visdial
from .report import EvalReport, Results

if TYPE_CHECKING:
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


def run(pipeline: Pipeline, opts: EvalOptions, *, model_name: str) -> EvalReport:
    dialogs = limited(read_visdial(opts.data), opts.limit)
    folder, found, missing = visdial_images(opts, dialogs)
    size = pipeline.image_processor.size
    ids = [str(d.image_id) for d in found]
    ok, matrix, unreadable = candidate_embeddings(
        pipeline,
        ids,
        [folder.find(d.image_id) for d in found],
        opts.out,
        batch_size=opts.batch_size,
        squash_to=size,
        show_progress=opts.progress,
    )
    position = {image_id: k for k, image_id in enumerate(ok)}
    usable = [d for d in found if str(d.image_id) in position]
    results = Results(
        opts.out, "visdial-t2i", {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data)}
    )
    todo = [d for d in usable if str(d.image_id) not in results]
    for chunk in progress(
        batched(todo, opts.batch_size), -(-len(todo) // opts.batch_size), "visdial-t2i", opts.progress
    ):
        query = embed_prompts(pipeline, [dialogue_text(d) for d in chunk], batch_size=opts.batch_size)
        scores = query.embeddings @ matrix.T
        for b, d in enumerate(chunk):
            top = torch.argsort(scores[b], descending=True, stable=True)[:10]
            results.add(
                {
                    "id": d.image_id,
                    "rank": rank_of(scores[b], position[str(d.image_id)]),
                    "top": [ok[int(k)] for k in top],
                    "query": [round(float(x), 7) for x in query.embeddings[b]],
                }
            )
    done = [r for r in results if r["id"] in position]
    metrics = {"t2i": recall_at([r["rank"] for r in done])}
    if done:  # the published orientation: for each image, the rank of its dialogue among all dialogues
        queries = torch.tensor([r["query"] for r in done])
        images = matrix[[position[r["id"]] for r in done]]
        by_image = images @ queries.T  # (N, N)
        metrics["i2t (published script's axis)"] = recall_at([rank_of(by_image[i], i) for i in range(len(done))])
    counts = {
        "dialogues": len(dialogs),
        "evaluated": len(done),
        "skipped (image missing from the folder)": missing,
        "skipped (image does not open)": len(unreadable),
        "candidate images": len(ok),
    }
    notes = [f"--limit {opts.limit}: candidates are those dialogues' images only"] if opts.limit else []
    return EvalReport("visdial-t2i", model_name, metrics, counts, notes)
