"""``captioning``: zero-shot image captioning with MAGIC (Su et al. 2022, Table 1) on the Karpathy test split of
MSCOCO (``--model magic-mscoco``) or Flickr30k (``magic-flickr30k``), or with any other MAGIC config: BLEU-1..4,
METEOR, ROUGE-L, CIDEr, SPICE.

Each image is captioned with the preset's published decoding (k, alpha, beta, length: ``MagicModel.generate``);
captions are scored against the split's references with pycocoevalcap (``caption_metrics``). An image of the
split that is not in the folder is an error (the protocol scores every test image), unless ``--limit`` is given,
where only the first N images are captioned. The table prints the paper's MSCOCO and Flickr30k rows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .caption_metrics import score_captions
from .common import EvalOptions, limited, open_image
from .readers import CaptionedImage, DataError, ImageFolder, read_captions
from .report import EvalReport
from .shards import Processes
from .task import EvalTask, Plan

if TYPE_CHECKING:  # types only: the task runs on the model its caller loaded
    from ..magic.model import MagicModel


logger = logging.getLogger(__name__)


class Captioning(EvalTask["MagicModel", CaptionedImage]):
    name = "captioning"
    help = "MAGIC captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE"
    needs = "magic"

    def read(self, opts: EvalOptions) -> tuple[list[CaptionedImage], ImageFolder]:
        items = limited(read_captions(opts.data, opts.split), opts.limit)
        folder = ImageFolder(opts.need_images("COCO_val2014_000000391895.jpg"))
        absent = [it for it in items if folder.find(it.file) is None]
        if absent:
            raise DataError(
                f"{len(absent)} of the {len(items)} images of {opts.data} are not in {folder.root} "
                f"(e.g. {absent[0].file}); the protocol captions every test image: put them there "
                f"(as Karpathy's filepath/filename, or filename)"
            )
        return items, folder

    def id_of(self, example: CaptionedImage) -> str:
        return example.image_id

    def batch_size(self, opts: EvalOptions) -> int:
        if opts.batch_size != 1:
            logger.info("MAGIC decodes one image at a time (its CLIP re-ranks each step's candidates): no --batch-size")
        return 1

    def plan(self, magic: MagicModel, data, opts: EvalOptions, processes: Processes) -> Plan:
        items, folder = data
        key = {"model": magic.config.name, "settings": str(magic.config.decoding), "data": str(opts.data)}
        return Plan(items, {**key, "split": opts.split}, {"folder": folder})

    def run_batch(self, magic: MagicModel, plan: Plan, batch: list[CaptionedImage], opts: EvalOptions) -> list[dict]:
        it = batch[0]
        caption = magic.generate([open_image(plan.fields["folder"].find(it.file))]).text
        return [{"id": it.image_id, "file": it.file, "caption": caption, "references": list(it.references)}]

    def report(
        self, magic: MagicModel, plan: Plan, records: list[dict], opts: EvalOptions, model_name: str
    ) -> EvalReport:
        items = plan.examples
        done = {r["id"]: r for r in records}
        predictions = {it.image_id: done[it.image_id]["caption"] for it in items}
        refs = {it.image_id: it.references for it in items}
        chosen = {"metrics": opts.caption_metrics} if opts.caption_metrics else {}
        scores = score_captions(predictions, refs, **chosen)
        for image_id, per in scores.per_image.items():  # per-example metrics, next to each caption
            done[image_id]["metrics"] = per
        (opts.out / "captions.json").write_text(_coco_results(done.values()), encoding="utf-8")
        notes = [f"{m} not run: {why}" for m, why in scores.not_run.items()]
        notes.append(f"tokenizer: {'Stanford PTBTokenizer' if scores.tokenizer == 'ptb' else 'simple rule (no Java)'}")
        counts = {"images": len(items), "captioned": len(predictions)}
        split = f"{opts.split} split" if opts.split else "every image"
        return EvalReport(self.name, model_name, {split: scores.scores}, counts, notes)


def _coco_results(records) -> str:
    """The COCO results format (``[{image_id, caption}]``) other caption-evaluation tools read."""
    import json

    return json.dumps([{"image_id": r["id"], "caption": r["caption"]} for r in records], indent=1)
