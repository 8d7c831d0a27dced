"""``captioning``: zero-shot image captioning with MAGIC (Su et al. 2022, Table 1) on the Karpathy test split of
MSCOCO (``--model magic-mscoco``) or Flickr30k (``magic-flickr30k``): BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

Each image is captioned with the preset's published decoding (k, alpha, beta, length: ``MagicModel.generate``);
captions are scored against the split's references with pycocoevalcap (``caption_metrics``). An image of the
split that is not in the folder is an error (the protocol scores every test image), unless ``--limit`` is given,
where only the first N images are captioned. The table prints the paper's MSCOCO and Flickr30k rows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .caption_metrics import score_captions
from .common import EvalOptions, limited, open_image, progress
from .readers import DataError, ImageFolder, read_captions
from .report import EvalReport, Results

if TYPE_CHECKING:
    from ..magic.model import MagicModel

logger = logging.getLogger(__name__)


def run(magic: MagicModel, opts: EvalOptions, *, model_name: str) -> EvalReport:
    items = limited(read_captions(opts.data, opts.split), opts.limit)
    folder = ImageFolder(opts.need_images("COCO_val2014_000000391895.jpg"))
    absent = [it for it in items if folder.find(it.file) is None]
    if absent:
        raise DataError(
            f"{len(absent)} of the {len(items)} images of {opts.data} are not in {folder.root} "
            f"(e.g. {absent[0].file}); the protocol captions every test image: put them there "
            f"(as Karpathy's filepath/filename, or filename)"
        )
    key = {"model": model_name, "settings": str(magic.config.decoding), "data": str(opts.data), "split": opts.split}
    results = Results(opts.out, "captioning", key)
    todo = [it for it in items if it.image_id not in results]
    if opts.batch_size != 1 and todo:
        logger.info("MAGIC decodes one image at a time (its CLIP re-ranks each step's candidates); --batch-size unused")
    for it in progress(todo, len(todo), "captioning", opts.progress):
        caption = magic.generate([open_image(folder.find(it.file))]).text
        results.add({"id": it.image_id, "file": it.file, "caption": caption, "references": list(it.references)})
    done = {r["id"]: r for r in results}
    predictions = {i: done[i]["caption"] for i in (it.image_id for it in items)}
    refs = {it.image_id: it.references for it in items}
    scores = score_captions(predictions, refs, **({"metrics": opts.caption_metrics} if opts.caption_metrics else {}))
    for image_id, per in scores.per_image.items():  # per-example metrics, next to each caption
        done[image_id]["metrics"] = per
    (opts.out / "captions.json").write_text(_coco_results(done.values()), encoding="utf-8")
    notes = [f"{m} not run: {why}" for m, why in scores.not_run.items()]
    notes.append(f"tokenizer: {'Stanford PTBTokenizer' if scores.tokenizer == 'ptb' else 'simple rule (no Java)'}")
    counts = {"images": len(items), "captioned": len(predictions)}
    return EvalReport("captioning", model_name, {"": scores.scores}, counts, notes)


def _coco_results(records) -> str:
    """The COCO results format (``[{image_id, caption}]``) other caption-evaluation tools read."""
    import json

    return json.dumps([{"image_id": r["id"], "caption": r["caption"]} for r in records], indent=1)
