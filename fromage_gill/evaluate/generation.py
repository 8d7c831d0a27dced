"""``vist-generation`` / ``visdial-generation``: GILL's contextual image generation (GILL Table 1), each image
compared with the ground truth by CLIP image-image cosine and LPIPS, and FID over the whole set; Stable Diffusion
alone, given the same text and the same seed, is the baseline in the same run.

Protocols of the published scripts (gill ``evals/generate_vist_images.py`` / ``generate_visdial_images.py``):
- VIST: the story's captions interleaved with its first n-1 images (squashed to 224 px), ``c1 i1 ... c5``; the
  ground truth is the last image. Stable Diffusion alone gets the captions joined by spaces.
- VisDial: the dialogue ``"Q: q1?\\nA: a1\\nQ: ..."``; the ground truth is the dialogue's image.
GILL's image is Stable Diffusion on ``probe.generation_embeddings`` of the prompt (the image tokens straight after
it, where the scripts force them with ``gen_scale_factor=1e5``). Both images are saved under ``out/images/``.
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
from .common import EvalOptions, batched, limited, open_image, progress
from .image_metrics import MetricUnavailable, clip_similarities, fid, fid_metric, lpips_distances, lpips_metric
from .readers import DataError, ImageFolder, read_visdial, read_vist
from .report import EvalReport, Results
from .visdial_t2i import visdial_images

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

SYSTEMS = ("gill", "sd")  # GILL, and Stable Diffusion alone on the same text


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list  # interleaved str / images for GILL
    text: str  # what Stable Diffusion alone reads
    truth: Path


def vist_examples(pipeline: Pipeline, opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
    stories = limited(read_vist(opts.data), opts.limit)
    folder = ImageFolder(opts.need_images("<photo_flickr_id>.png"))
    folder.require_some("the VIST images named by photo_flickr_id", "4368632.png")
    size = pipeline.image_processor.size
    out, missing = [], 0
    for s in stories:
        paths = [folder.find(i.image_id) for i in s.items]
        if len(s.items) < 2 or any(p is None for p in paths):
            missing += 1
            continue
        prompt = []
        for k, item in enumerate(s.items):
            prompt.append(item.text)
            if k < len(s.items) - 1:
                prompt.append(open_image(paths[k], squash_to=size))
        out.append(Example(s.story_id, prompt, " ".join(i.text for i in s.items), paths[-1]))
    if not out:
        raise DataError(f"none of the {len(stories)} stories has all its images in {folder.root}")
    return out, {"stories": len(stories), "skipped (an image missing from the folder)": missing}


def visdial_examples(pipeline: Pipeline, opts: EvalOptions) -> tuple[list[Example], dict[str, int]]:
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
        out.append(Example(str(d.image_id), [text], text, folder.find(d.image_id)))
    return out, {"dialogues": len(dialogs), "skipped (image missing from the folder)": missing}


def run_vist(pipeline: Pipeline, opts: EvalOptions, *, model_name: str, **metrics) -> EvalReport:
    examples, counts = vist_examples(pipeline, opts)
    return _run("vist-generation", pipeline, opts, examples, counts, model_name, **metrics)


def run_visdial(pipeline: Pipeline, opts: EvalOptions, *, model_name: str, **metrics) -> EvalReport:
    examples, counts = visdial_examples(pipeline, opts)
    return _run("visdial-generation", pipeline, opts, examples, counts, model_name, **metrics)


def _run(
    task: str,
    pipeline: Pipeline,
    opts: EvalOptions,
    examples: list[Example],
    counts: dict[str, int],
    model_name: str,
    *,
    judge=None,
    judge_error: str | None = None,
    lpips_backbone: str = "alex",
    fid_feature: int | torch.nn.Module = 2048,
) -> EvalReport:
    generator = image_generator(pipeline)  # a clear error for a model that cannot generate, before any work
    notes: list[str] = []
    lpips = _try(lambda: lpips_metric(lpips_backbone), "LPIPS", notes)
    if judge is None:
        notes.append(f"CLIP similarity not run: {judge_error or 'no --judge-clip given'}")
    dirs = {s: opts.out / "images" / s for s in SYSTEMS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    key = {"model": pipeline.model.retrieval_fingerprint(), "data": str(opts.data), "seed": opts.seed}
    key |= {"steps": opts.num_inference_steps, "guidance": opts.guidance_scale}
    results = Results(opts.out, task, key)
    todo = [e for e in examples if e.id not in results]

    def draw(prompt_embeds: torch.Tensor) -> Image.Image:
        steps, guidance = opts.num_inference_steps, opts.guidance_scale
        return generator(prompt_embeds, guidance_scale=guidance, num_inference_steps=steps, seed=opts.seed).images[0]

    for chunk in progress(batched(todo, opts.batch_size), -(-len(todo) // opts.batch_size), task, opts.progress):
        prompts: list[PromptLike] = [e.prompt for e in chunk]
        ours = generation_embeddings(pipeline, prompts, batch_size=opts.batch_size).embeddings
        for e, pe in zip(chunk, ours, strict=True):
            images = {
                "gill": draw(pe[None]),
                "sd": draw(_sd_embeds(pipeline, e.text)),
            }
            truth = open_image(e.truth)
            record = {"id": e.id, "truth": str(e.truth)}
            for system, image in images.items():
                image.save(dirs[system] / f"{e.id}.png")
                scores = {}
                if judge is not None:
                    scores["CLIP sim"] = clip_similarities(judge, [image], [truth])[0]
                if lpips is not None:
                    scores["LPIPS"] = lpips_distances(lpips, [image], [truth])[0]
                record[system] = scores
            results.add(record)
    done = [r for r in results if r["id"] in {e.id for e in examples}]
    metrics = {s: _means([r[s] for r in done]) for s in SYSTEMS}
    fid_net = _try(lambda: fid_metric(fid_feature), "FID", notes) if len(done) >= 2 else None
    if len(done) < 2:
        notes.append("FID not run: it needs at least 2 examples")
    if fid_net is not None:
        truths = [open_image(Path(r["truth"])) for r in done]
        for s in SYSTEMS:
            metrics[s]["FID"] = fid(fid_net, truths, [Image.open(dirs[s] / f"{r['id']}.png") for r in done])
    names = {"gill": "GILL", "sd": "Stable Diffusion alone"}
    report = EvalReport(
        task, model_name, {names[s]: metrics[s] for s in SYSTEMS}, {**counts, "evaluated": len(done)}, notes
    )
    return report


@torch.no_grad()
def _sd_embeds(pipeline: Pipeline, text: str) -> torch.Tensor:
    """(1, L, D) Stable Diffusion's own text-encoder output for ``text`` (truncated to its 77 tokens)."""
    sd = pipeline.diffusion
    embeds, _ = sd.encode_prompt(text, sd.text_encoder.device, 1, False)
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
