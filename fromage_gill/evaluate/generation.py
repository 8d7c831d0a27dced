"""``vist-generation`` / ``visdial-generation``: GILL's contextual image generation (GILL Table 1), each image
compared with the ground truth by CLIP image-image cosine and LPIPS, and FID over the whole set; Stable Diffusion
alone, given the same text and the same seed, is the baseline in the same run.

Protocols of the published scripts (gill ``evals/generate_vist_images.py`` / ``generate_visdial_images.py``):
- VIST: the story's captions interleaved with its first n-1 images (squashed to 224 px), ``c1 i1 ... c5``; the
  ground truth is the last image. Stable Diffusion alone gets the captions joined by spaces.
- VisDial: the dialogue ``"Q: q1?\\nA: a1\\nQ: ..."``; the ground truth is the dialogue's image.
GILL's image is Stable Diffusion on ``probe.generation_embeddings`` of the prompt (the image tokens straight after
it, where the scripts force them with ``gen_scale_factor=1e5``). Both images are saved under ``out/images/``.
``--batch-size`` prompts go through each diffusion call (one call for GILL's, one for Stable Diffusion's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..generate.diffusion import image_generator
from ..probe import PromptLike, generation_embeddings
from ..typed_json import JSONValue
from .common import EvalOptions, limited, open_image
from .image_metrics import MetricUnavailable, clip_similarities, fid, fid_metric, lpips_distances, lpips_metric
from .readers import DataError, ImageFolder, read_visdial, read_vist
from .report import EvalReport
from .shards import Processes
from .task import EvalTask, Plan
from .visdial_t2i import visdial_images

if TYPE_CHECKING:  # types only: the task runs on the model its caller loaded
    from ..pipeline import Pipeline


logger = logging.getLogger(__name__)

SYSTEMS = ("gill", "sd")  # GILL, and Stable Diffusion alone on the same text


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[str | Path]  # interleaved text / image files for GILL (images squashed when the batch runs)
    text: str  # what Stable Diffusion alone reads
    truth: Path


def vist_examples(opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
    stories = limited(read_vist(opts.data), opts.limit)
    folder = ImageFolder(opts.need_images("<photo_flickr_id>.png"))
    folder.require_some("the VIST images named by photo_flickr_id", "4368632.png")
    out, missing = [], 0
    for s in stories:
        paths = [folder.find(i.image_id) for i in s.items]
        if len(s.items) < 2 or any(p is None for p in paths):
            missing += 1
            continue
        prompt: list[str | Path] = []
        for k, item in enumerate(s.items):
            prompt.append(item.text)
            if k < len(s.items) - 1:
                prompt.append(folder.path(item.image_id))
        out.append(Example(s.story_id, prompt, " ".join(i.text for i in s.items), folder.path(s.items[-1].image_id)))
    if not out:
        raise DataError(f"none of the {len(stories)} stories has all its images in {folder.root}")
    return out, {"stories": len(stories), "skipped (an image missing from the folder)": missing}


def visdial_examples(opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
    dialogs = limited(read_visdial(opts.data), opts.limit)
    folder, found, missing = visdial_images(opts, dialogs)
    out = []
    for d in found:
        lines = []
        for r in d.rounds:
            lines.append(f"Q: {r.question}?")
            if r.answer is not None:
                lines.append(f"A: {r.answer}")
        text = "\n".join(lines)
        out.append(Example(str(d.image_id), [text], text, folder.path(d.image_id)))
    return out, {"dialogues": len(dialogs), "skipped (image missing from the folder)": missing}


class _Generation(EvalTask["Pipeline", Example]):
    """GILL and Stable Diffusion alone on the same text and seed, ``--batch-size`` prompts per diffusion call."""

    needs = "gill"

    def plan(
        self,
        pipeline: Pipeline,
        data,
        opts: EvalOptions,
        processes: Processes,
        *,
        judge=None,
        judge_error: str | None = None,
        lpips_backbone: str = "alex",
        fid_feature: int | torch.nn.Module = 2048,
    ) -> Plan:
        examples, counts = data
        generator = image_generator(pipeline)  # a clear error for a model that cannot generate, before any work
        notes: list[str] = []
        lpips = _try(lambda: lpips_metric(lpips_backbone), "LPIPS", notes)
        if judge is None:
            notes.append(f"CLIP similarity not run: {judge_error or 'no --judge-clip given'}")
        if opts.batch_size > 1:
            notes.append(
                f"{opts.batch_size} prompts per diffusion call: each image's starting noise is the seed's draw at "
                f"its place in the batch (the published scripts: one prompt per call), the same in GILL's and "
                f"Stable Diffusion's call; --batch-size 1 reproduces the scripts' noise"
            )
        dirs = {s: opts.out / "images" / s for s in SYSTEMS}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data), "seed": opts.seed}
        key |= {"steps": opts.num_inference_steps, "guidance": opts.guidance_scale, "batch": opts.batch_size}
        fields = {"generator": generator, "lpips": lpips, "judge": judge, "notes": notes, "dirs": dirs}
        return Plan(examples, key, {**fields, "counts": counts, "fid_feature": fid_feature})

    def run_batch(self, pipeline: Pipeline, plan: Plan, batch: list[Example], opts: EvalOptions) -> list[dict]:
        f = plan.fields
        size = pipeline.image_processor.size
        settings = dict(
            guidance_scale=opts.guidance_scale, num_inference_steps=opts.num_inference_steps, seed=opts.seed
        )
        prompts: list[PromptLike] = [
            [open_image(p, squash_to=size) if isinstance(p, Path) else p for p in e.prompt] for e in batch
        ]
        ours = generation_embeddings(pipeline, prompts, batch_size=opts.batch_size).embeddings  # (B, 77, 768)
        images = {
            "gill": f["generator"](ours, **settings).images,
            "sd": f["generator"](_sd_embeds(pipeline, [e.text for e in batch]), **settings).images,
        }
        records = []
        for b, e in enumerate(batch):
            truth = open_image(e.truth)
            record: dict[str, JSONValue] = {"id": e.id, "truth": str(e.truth)}
            for system in SYSTEMS:
                image = images[system][b]
                image.save(f["dirs"][system] / f"{e.id}.png")
                scores = {}
                if f["judge"] is not None:
                    scores["CLIP sim"] = clip_similarities(f["judge"], [image], [truth])[0]
                if f["lpips"] is not None:
                    scores["LPIPS"] = lpips_distances(f["lpips"], [image], [truth])[0]
                record[system] = scores
            records.append(record)
        return records

    def report(
        self, pipeline: Pipeline, plan: Plan, done: list[dict], opts: EvalOptions, model_name: str
    ) -> EvalReport:
        f = plan.fields
        notes = list(f["notes"])
        metrics = {s: _means([r[s] for r in done]) for s in SYSTEMS}
        fid_net = _try(lambda: fid_metric(f["fid_feature"]), "FID", notes) if len(done) >= 2 else None
        if len(done) < 2:
            notes.append("FID not run: it needs at least 2 examples")
        if fid_net is not None:
            truths = [open_image(Path(r["truth"])) for r in done]
            for s in SYSTEMS:
                metrics[s]["FID"] = fid(fid_net, truths, [Image.open(f["dirs"][s] / f"{r['id']}.png") for r in done])
        names = {"gill": "GILL", "sd": "Stable Diffusion alone"}
        counts = {**f["counts"], "evaluated": len(done)}
        return EvalReport(self.name, model_name, {names[s]: metrics[s] for s in SYSTEMS}, counts, notes)


class VistGeneration(_Generation):
    name = "vist-generation"
    help = "VIST image generation: CLIP sim, LPIPS, FID vs SD"

    def read(self, opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
        return vist_examples(opts)


class VisdialGeneration(_Generation):
    name = "visdial-generation"
    help = "VisDial image generation: CLIP sim, LPIPS, FID vs SD"

    def read(self, opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
        return visdial_examples(opts)


@torch.no_grad()
def _sd_embeds(pipeline: Pipeline, texts: list[str]) -> torch.Tensor:
    """(B, L, D) Stable Diffusion's own text-encoder output for ``texts`` (each truncated to its 77 tokens)."""
    sd = pipeline.diffusion
    if sd is None:
        raise ValueError(f"{pipeline.config.name} has no diffusion model loaded: contextual generation needs GILL's")
    embeds, _ = sd.encode_prompt(texts, sd.text_encoder.device, 1, False)
    return embeds


def _try(build, name: str, notes: list[str]):
    try:
        return build()
    except MetricUnavailable as e:
        notes.append(f"{name} not run: {e}")
        return None


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in sorted(keys)}
