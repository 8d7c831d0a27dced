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
from .common import EvalOptions, candidate_embeddings, limited, open_image
from .metrics import rank_of, recall_at
from .papers import VIST_SETTINGS
from .readers import DataError, ImageFolder, Story, read_vist
from .report import EvalReport
from .shards import Processes
from .task import EvalTask, Plan

if TYPE_CHECKING:  # types only: the task runs on the model its caller loaded
    from transformers import PreTrainedTokenizerBase

    from ..pipeline import Pipeline


logger = logging.getLogger(__name__)

TOP = 10


class VistRetrieval(EvalTask["Pipeline", Story]):
    name = "vist-retrieval"
    help = "VIST contextual image retrieval, R@1/5/10 (3 settings)"

    def read(self, opts: EvalOptions) -> tuple[list[Story], ImageFolder]:
        stories = limited(read_vist(opts.data), opts.limit)
        folder = ImageFolder(opts.need_images("<photo_flickr_id>.jpg"))
        folder.require_some("the VIST images named by photo_flickr_id", "4368632.jpg")
        if not any(len(s.items) >= 2 and all(folder.find(i.image_id) for i in s.items) for s in stories):
            missing = next(
                (i.image_id for s in stories for i in s.items if folder.find(i.image_id) is None), "(none: too short)"
            )
            raise DataError(
                f"none of the {len(stories)} stories has all its images in {folder.root} (e.g. no file for "
                f"photo_flickr_id {missing}); expected files named <photo_flickr_id>.jpg / .png"
            )
        return stories, folder

    def id_of(self, example: Story) -> str:
        return example.story_id

    def plan(self, pipeline: Pipeline, data, opts: EvalOptions, processes: Processes) -> Plan:
        stories, folder = data
        usable = [s for s in stories if len(s.items) >= 2 and all(folder.find(i.image_id) for i in s.items)]
        ids = sorted({i.image_id for s in usable for i in s.items})
        with processes.main_first():  # rank 0 embeds the candidates once; the others read its cache
            ids, matrix, unreadable = candidate_embeddings(
                pipeline,
                ids,
                [folder.find(i) for i in ids],
                opts.out,
                batch_size=opts.batch_size,
                show_progress=opts.progress and processes.is_main,
            )
        position = {image_id: k for k, image_id in enumerate(ids)}
        readable = [s for s in usable if all(i.image_id in position for i in s.items)]
        key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data), "candidates": len(ids)}
        fields = {"stories": stories, "usable": usable, "folder": folder, "matrix": matrix, "position": position}
        return Plan(readable, key, {**fields, "ids": ids, "unreadable": unreadable})

    def run_batch(self, pipeline: Pipeline, plan: Plan, batch: list[Story], opts: EvalOptions) -> list[dict]:
        f = plan.fields
        return _evaluate(pipeline, batch, f["folder"], f["matrix"], f["position"], f["ids"])

    def report(
        self, pipeline: Pipeline, plan: Plan, records: list[dict], opts: EvalOptions, model_name: str
    ) -> EvalReport:
        f = plan.fields
        stories, usable = f["stories"], f["usable"]
        short = sum(len(s.items) < 2 for s in stories)
        metrics = {s: recall_at([r["settings"][s]["rank"] for r in records]) for s in VIST_SETTINGS}
        counts = {
            "stories": len(stories),
            "evaluated": len(records),
            "skipped (an image missing from the folder)": len(stories) - len(usable) - short,
            "skipped (an image that does not open)": len(usable) - len(plan.examples),
            "skipped (fewer than 2 items)": short,
            "candidate images": len(f["ids"]),
        }
        notes = []
        if f["unreadable"]:
            notes.append(f"{len(f['unreadable'])} image file(s) did not open and are no candidates (see the log)")
        if opts.limit is not None:
            notes.append(f"--limit {opts.limit}: candidates are the images of those stories only (the paper: all val)")
        return EvalReport(self.name, model_name, metrics, counts, notes)


def _evaluate(pipeline: Pipeline, stories: list[Story], folder: ImageFolder, matrix, position, ids) -> list[dict]:
    tok = pipeline.tokenizer
    bos = (tok.bos_token_id,) if isinstance(tok.bos_token_id, int) else ()  # None: the tokenizer has none
    captions = [[TokenIds((*bos, *_ids(tok, i.text))) for i in s.items] for s in stories]
    prompts = {
        "1 caption": [c[-1:] for c in captions],
        "5 captions": captions,
        "5 captions + 4 images": [
            [p for k, cap in enumerate(c[:-1]) for p in (cap, open_image(folder.path(s.items[k].image_id)))] + c[-1:]
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


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s token ids, no special tokens (``encode``'s declared result also covers batched input)."""
    return [int(t) for t in tok.encode(text, add_special_tokens=False)]
