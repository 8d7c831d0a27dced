"""``vist-retrieval``: VIST contextual image retrieval (FROMAGe Table 1, GILL Table 2), R@1/5/10.

Protocol of the published script (fromage ``evals/eval_vist_retrieval.py``): for each story of the SIS val set, the
last image is retrieved from the images of all stories, given
- "1 caption": the last caption alone;
- "5 captions": every caption of the story;
- "5 captions + 4 images": the captions interleaved with the story's other images, ``c1 i1 c2 i2 ... c5``;
each caption tokenized with its own BOS, then the image tokens ([RET] / [IMG0..r-1]); the query is the retrieval
embedding at the first image token (``probe.embed_prompts``). The story's context images are never candidates.
A story whose images are not all in the folder is skipped and counted, as the script skips dead Flickr links.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..generate.prompt import TokenIds
from ..probe import embed_prompts
from .common import EvalOptions, batched, candidate_embeddings, limited, open_image, progress
from .metrics import rank_of, recall_at
from .papers import VIST_SETTINGS
from .readers import DataError, ImageFolder, Story, read_vist
from .report import EvalReport, Results

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

TOP = 10


def run(pipeline: Pipeline, opts: EvalOptions, *, model_name: str) -> EvalReport:
    stories = limited(read_vist(opts.data), opts.limit)
    folder = ImageFolder(opts.need_images("<photo_flickr_id>.jpg"))
    folder.require_some("the VIST images named by photo_flickr_id", "4368632.jpg")
    usable = [s for s in stories if len(s.items) >= 2 and all(folder.find(i.image_id) for i in s.items)]
    short = sum(len(s.items) < 2 for s in stories)
    if not usable:
        missing = next(i.image_id for s in stories for i in s.items if folder.find(i.image_id) is None)
        raise DataError(
            f"none of the {len(stories)} stories has all its images in {folder.root} (e.g. no file for "
            f"photo_flickr_id {missing}); expected files named <photo_flickr_id>.jpg / .png"
        )
    ids = sorted({i.image_id for s in usable for i in s.items})
    ids, matrix, unreadable = candidate_embeddings(
        pipeline, ids, [folder.find(i) for i in ids], opts.out, batch_size=opts.batch_size, show_progress=opts.progress
    )
    position = {image_id: k for k, image_id in enumerate(ids)}
    readable = [s for s in usable if all(i.image_id in position for i in s.items)]
    run_key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data), "candidates": len(ids)}
    results = Results(opts.out, "vist-retrieval", run_key)
    todo = [s for s in readable if s.story_id not in results]
    for chunk in progress(
        batched(todo, opts.batch_size), -(-len(todo) // opts.batch_size), "vist-retrieval", opts.progress
    ):
        for record in _evaluate(pipeline, chunk, folder, matrix, position, ids):
            results.add(record)
    done = [r for r in results if r["id"] in {s.story_id for s in readable}]
    metrics = {s: recall_at([r["settings"][s]["rank"] for r in done]) for s in VIST_SETTINGS}
    counts = {
        "stories": len(stories),
        "evaluated": len(done),
        "skipped (an image missing from the folder)": len(stories) - len(usable) - short,
        "skipped (an image that does not open)": len(usable) - len(readable),
        "skipped (fewer than 2 items)": short,
        "candidate images": len(ids),
    }
    notes = []
    if unreadable:
        notes.append(f"{len(unreadable)} image file(s) did not open and are no candidates (see the log)")
    if opts.limit is not None:
        notes.append(f"--limit {opts.limit}: candidates are the images of those stories only (the paper: all val)")
    return EvalReport("vist-retrieval", model_name, metrics, counts, notes)


def _evaluate(pipeline: Pipeline, stories: list[Story], folder: ImageFolder, matrix, position, ids) -> list[dict]:
    tok = pipeline.tokenizer
    bos = () if tok.bos_token_id is None else (tok.bos_token_id,)
    captions = [[TokenIds((*bos, *tok(i.text, add_special_tokens=False).input_ids)) for i in s.items] for s in stories]
    prompts = {
        "1 caption": [c[-1:] for c in captions],
        "5 captions": captions,
        "5 captions + 4 images": [
            [p for k, cap in enumerate(c[:-1]) for p in (cap, open_image(folder.find(s.items[k].image_id)))] + c[-1:]
            for s, c in zip(stories, captions, strict=True)
        ],
    }
    records = [{"id": s.story_id, "gt": s.items[-1].image_id, "settings": {}} for s in stories]
    for setting in VIST_SETTINGS:
        query = embed_prompts(pipeline, prompts[setting], bos=False, batch_size=len(stories)).embeddings
        scores = query @ matrix.T  # (B, M): the ranking of the index (cosine)
        for b, s in enumerate(stories):
            row = scores[b].clone()
            row[[position[i.image_id] for i in s.items[:-1]]] = -torch.inf  # context images are never candidates
            top = torch.argsort(row, descending=True, stable=True)[:TOP]
            records[b]["settings"][setting] = {
                "rank": rank_of(row, position[s.items[-1].image_id]),
                "top": [ids[int(k)] for k in top],
            }
    return records
