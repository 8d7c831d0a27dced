"""``fromage-gill toy eval``: how well toy-fromage / toy-gill learned, on held-out world images and prompts.

Every figure uses scenes of the "test" split (attribute combinations never seen in training) and fixed seeds, so a
run is the same on every machine. Measured, as the toy-world issue asks:

- captioning: the image alone, greedy decoding; correct when the first colour word and the first shape word of
  the caption are the scene's (single-shape images);
- retrieval: caption -> image over the held-out gallery (the shipped index's images), R@1/5/10 and chance, and
  match@k: an image with every attribute the caption names is in the top k (several gallery images often fit a
  caption equally, so R@1 has a ceiling below 1, reported too);
- generation (GILL): caption -> [IMG] tokens -> GILLMapper -> the toy diffusion stack; the dominant colour of the
  image and the small CLIP's choice among the six shapes, next to the same diffusion stack driven by its own text
  encoder (GILL's comparison with Stable Diffusion alone);
- decision (GILL): "show me ..." vs "draw ..." prompts routed to retrieval vs generation;
- dialogue: two shown images and a yes/no comparison question, answered through the chat engine's dialogue
  template; also a one-image "What colour is the shape?" question.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..prompt import TokenIds
from . import world as W
from .method import gallery_scenes

EVAL_SEED = 95  # offset from the recipe seed for the evaluation's own held-out scenes

_COLOUR_RE = re.compile(r"\b(" + "|".join(W.COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(W.SHAPES) + r")s?\b")


@dataclass
class ToyEval:
    model: str
    n: dict[str, int] = field(default_factory=dict)  # examples per measure
    caption_colour: float = 0.0
    caption_shape: float = 0.0
    caption_both: float = 0.0
    retrieval: dict[str, float] = field(default_factory=dict)  # R@1/5/10 and chance_R@1
    generation: dict[str, float] = field(default_factory=dict)  # ours and the diffusion stack alone
    decision: float | None = None
    compare: float = 0.0
    chat_colour: float = 0.0
    samples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def first_match(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def evaluate(pipe, *, n: int = 60, gallery: int = 300, steps: int = 25, guidance: float = 4.0,
             clip_dir: str | Path | None = None, seed: int = 0) -> ToyEval:
    """Every measure for ``pipe`` (a toy-fromage or toy-gill pipeline); ``n`` examples per measure."""
    from ..generate import GenerationSettings, generate_batch

    res = ToyEval(model=pipe.config.name)
    greedy = GenerationSettings(max_new_tokens=20, temperature=0.0, mode="text", seed=0)
    singles = W.scenes(n, split="test", seed=seed + EVAL_SEED, two=False)
    images = [s.render() for s in singles]

    # Captioning: [image][BOS] -> text, as trained.
    outs = generate_batch(pipe, [[im, TokenIds(())] for im in images], greedy)
    texts = [o.text.strip() for o in outs]
    colour = [first_match(_COLOUR_RE, t) == s.things[0].colour for t, s in zip(texts, singles, strict=True)]
    shape = [first_match(_SHAPE_RE, t) == s.things[0].shape for t, s in zip(texts, singles, strict=True)]
    res.caption_colour, res.caption_shape = _mean(colour), _mean(shape)
    res.caption_both = _mean([c and s for c, s in zip(colour, shape, strict=True)])
    res.samples["captions"] = [f"{s.caption} -> {t}" for s, t in zip(singles[:6], texts[:6], strict=True)]

    res.retrieval = retrieval(pipe, gallery_scenes(gallery, seed), seed=seed)

    # Dialogue, through the chat template: one image and a colour question; two images and a comparison.
    outs = generate_batch(pipe, [[im, "What colour is the shape?"] for im in images], greedy, dialogue=True)
    answers = [o.text.strip() for o in outs]
    res.chat_colour = _mean([first_match(_COLOUR_RE, a) == s.things[0].colour for a, s in zip(answers, singles,
                                                                                                strict=True)])
    res.samples["chat_colour"] = answers[:6]
    rng = np.random.default_rng([seed, EVAL_SEED])
    pairs = [W.compare_dialogue(singles[i], singles[(i + 1 + int(rng.integers(n - 1))) % n], rng) for i in range(n)]
    prompts = [[*(s.render() for s in d.turns[0].images), d.turns[0].text] for d in pairs]
    outs = generate_batch(pipe, prompts, greedy, dialogue=True)
    answers = [o.text.strip().lower() for o in outs]
    res.compare = _mean([a.split(" ")[0].rstrip(",.") == d.turns[1].text.split(",")[0].split(" ")[0].rstrip(",.")
                         for a, d in zip(answers, pairs, strict=True)])
    res.samples["compare"] = [f"{d.turns[0].text} -> {a}" for d, a in zip(pairs[:6], answers[:6], strict=True)]
    res.n = {"caption": n, "gallery": gallery, "dialogue": n}

    if pipe.config.kind == "gill":
        res.decision = decision(pipe, n, seed=seed)
        res.generation = generation(pipe, n, steps=steps, guidance=guidance, clip_dir=clip_dir, seed=seed)
        res.n.update(decision=n, generation=n)
    return res


def _mean(xs) -> float:
    return round(float(np.mean(xs)), 3) if len(xs) else 0.0


@torch.no_grad()
def image_token_hidden(pipe, texts: list[str]) -> torch.Tensor:
    """(N, r, d) last-layer hidden states at [RET] / [IMG0..r-1] after each text, laid out as in training."""
    from ..training.sequences import embed_layout, layout, retrieval_rows

    m, tok = pipe.model, pipe.tokenizer
    ids = tok(texts, add_special_tokens=False).input_ids
    rows, first = retrieval_rows(ids, bos_id=tok.bos_token_id, image_token_ids=m.image_token_ids)
    lay = layout(rows, n_visual=m.config.n_visual_tokens, pad_id=tok.pad_token_id, ignore_ids=frozenset())
    hidden = m.forward_lm(embed_layout(m, lay, None), lay.attention_mask, logits="none").hidden
    r = len(m.image_token_ids)
    return torch.stack([hidden[i, f:f + r] for i, f in enumerate(first)])


@torch.no_grad()
def retrieval(pipe, scenes: list[W.Scene], *, seed: int = 0) -> dict[str, float]:
    """Caption -> image over ``scenes``. ``R@k``: the captioned image itself is in the top k (the usual measure;
    in this world several gallery images often fit a caption equally, which caps it: ``R@1_ceiling``).
    ``match@k``: the top k hold an image with every attribute the caption names (what a user asking for it sees)."""
    m = pipe.model
    rng = np.random.default_rng([seed, EVAL_SEED, 1])
    flags = [dict(size=bool(rng.random() < 0.7), where=bool(rng.random() < 0.7), background=bool(rng.random() < 0.5))
             for _ in scenes]
    bodies = [W.describe(s, **f) for s, f in zip(scenes, flags, strict=True)]
    captions = [W.CAPTION_TEMPLATES[int(rng.integers(len(W.CAPTION_TEMPLATES)))].format(b) for b in bodies]
    text = m.text_embedding(image_token_hidden(pipe, captions)[:, 0])
    pixels = m.vision.processor([s.render() for s in scenes]).to(m.device)
    image = m.image_embedding(m.encode_images(pixels))
    ranks = (text @ image.T).argsort(dim=1, descending=True).cpu()
    hit = ranks == torch.arange(len(scenes))[:, None]
    fits = torch.tensor([[W.describe(o, **f) == b for o in scenes] for f, b in zip(flags, bodies, strict=True)])
    match = torch.gather(fits, 1, ranks)
    out = {f"R@{k}": round(float(hit[:, :k].any(1).float().mean()), 3) for k in (1, 5, 10)}
    out.update({f"match@{k}": round(float(match[:, :k].any(1).float().mean()), 3) for k in (1, 5, 10)})
    out["R@1_ceiling"] = round(float((1 / fits.sum(1).float()).mean()), 3)
    out["chance_R@1"] = round(1 / len(scenes), 4)
    out["chance_match@1"] = round(float(fits.float().mean()), 4)
    return out


@torch.no_grad()
def decision(pipe, n: int, *, seed: int = 0) -> float:
    from ..training.decision import LABELS

    prompts = W.decision_prompts(n, split="test", seed=seed + EVAL_SEED)
    hidden = image_token_hidden(pipe, [p for p, _ in prompts])[:, 0]
    pred = pipe.model.decide(hidden).argmax(-1).tolist()
    return _mean([p == LABELS[label] for p, (_, label) in zip(pred, prompts, strict=True)])


@torch.no_grad()
def generation(pipe, n: int, *, steps: int, guidance: float, clip_dir: str | Path | None, seed: int = 0
               ) -> dict[str, float]:
    """Dominant colour and CLIP shape accuracy of GILL's images and of the diffusion stack's own text path."""
    from transformers import AutoTokenizer, CLIPModel

    from ..diffusion import image_generator
    from ..pipeline import checkout_path
    from .pretrain import clip_embed_images, clip_embed_texts

    targets = W.scenes(n, split="test", seed=seed + EVAL_SEED + 1, two=False)
    prompts = [W.describe(s, where=False) for s in targets]
    gen = image_generator(pipe)
    ours, alone = [], []
    sd = pipe.diffusion
    sd.set_progress_bar_config(disable=True)
    for lo in range(0, n, 12):
        batch = prompts[lo:lo + 12]
        embeds = pipe.model.map_to_diffusion(image_token_hidden(pipe, batch))
        ours += gen(embeds, guidance_scale=guidance, num_inference_steps=steps, seed=seed + lo).images
        alone += sd(batch, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed + lo), height=W.IMAGE_SIZE,
                    width=W.IMAGE_SIZE).images
    clip_dir = Path(clip_dir or checkout_path(pipe.config.vision.source))
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    shapes = clip_embed_texts(clip, tok, [f"a {s}" for s in W.SHAPES])
    out = {}
    for name, images in (("gill", ours), ("diffusion_alone", alone)):
        colour = [W.dominant_colour(im) == s.things[0].colour for im, s in zip(images, targets, strict=True)]
        pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
        pred = (clip_embed_images(clip, pixels) @ shapes.T).argmax(1).tolist()
        shape = [W.SHAPES[p] == s.things[0].shape for p, s in zip(pred, targets, strict=True)]
        out[f"{name}_colour"], out[f"{name}_shape"] = _mean(colour), _mean(shape)
    return out
