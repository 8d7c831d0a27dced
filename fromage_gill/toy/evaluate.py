"""``fromage-gill toy eval``: how well toy-fromage / toy-gill learned, on held-out world images and prompts.

Every figure uses scenes of the "test" split (attribute combinations never seen in training) and fixed seeds, so a
run is the same on every machine. Measured, as the toy-world issue asks:

- captioning: the image alone, greedy decoding; correct when the first colour word and the first shape word of
  the caption are the scene's (single-shape images);
- retrieval: caption -> image over the held-out gallery (the shipped index's images, all different scenes):
  R@1/5/10 for complete captions, and match@k for partial ones (an image with every attribute the caption names
  is in the top k), with their chance levels;
- generation (GILL): caption -> [IMG] tokens -> GILLMapper -> the toy diffusion stack; the dominant colour of the
  image and the small CLIP's choice among the six shapes (``shape_judge``: the request's words with each shape in
  turn), next to the same diffusion stack driven by its own text
  encoder (GILL's comparison with Stable Diffusion alone);
- decision (GILL): "show me ..." vs "draw ..." prompts routed to retrieval vs generation;
- dialogue: two shown images and a yes/no comparison question, answered through the chat engine's dialogue
  template; also a one-image "What colour is the shape?" question;
- drawings: "What is in this image?" about the drawings set (``drawings.py``: the world's shapes as people draw them).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..generate import Chat, GenerationSettings, ImageResult, TextDelta, generate_batch, image_token_states
from ..generate.prompt import TokenIds
from . import drawings as D
from . import world as W

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
    requests: dict[str, float] = field(default_factory=dict)  # "show me" / "draw" asked in a chat, answered
    compare: float = 0.0
    compare_from_descriptions: float = 0.0  # the frozen LM told the images' descriptions instead of shown them
    chat_colour: float = 0.0
    drawings: dict[str, float] = field(default_factory=dict)  # "What is in this image?" about the drawings set
    long: dict[str, float] = field(default_factory=dict)  # conversations.long_conversations
    samples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def first_match(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def evaluate(
    pipe,
    *,
    n: int = 60,
    gallery: int = 300,
    steps: int = 25,
    guidance: float = 4.0,
    clip_dir: str | Path | None = None,
    drawings_dir: str | Path | None = D.DRAWINGS_DIR,
    seed: int = 0,
) -> ToyEval:
    """Every measure for ``pipe`` (toy-fromage or toy-gill), ``n`` examples each, and the drawings set's images."""
    res = ToyEval(model=pipe.config.name)
    (res.caption_colour, res.caption_shape, res.caption_both), res.samples["captions"] = captioning(pipe, n, seed=seed)
    res.retrieval = retrieval(pipe, W.gallery_scenes(gallery, seed), seed=seed)
    res.chat_colour, res.samples["chat_colour"] = colour_question(pipe, n, seed=seed)
    res.compare, res.samples["compare"] = comparison(pipe, n, seed=seed)
    res.compare_from_descriptions = comparison_from_descriptions(pipe, n, seed=seed)
    res.n = {"caption": n, "gallery": gallery, "dialogue": n}
    if drawings_dir is not None:
        res.drawings, res.samples["drawings"] = describe_drawings(
            pipe, drawings_dir, steps=steps, guidance=guidance, seed=seed
        )
    if pipe.config.kind == "gill":
        res.decision = decision(pipe, n, seed=seed)
        res.requests, res.samples["requests"] = requests(
            pipe, n, steps=steps, guidance=guidance, clip_dir=clip_dir, seed=seed
        )
        res.generation = generation(pipe, n, steps=steps, guidance=guidance, clip_dir=clip_dir, seed=seed)
        res.n.update(decision=n, generation=n, requests=n)
    return res


GREEDY = GenerationSettings(max_new_tokens=20, temperature=0.0, mode="text", seed=0)


def held_out_singles(n: int, seed: int = 0) -> list[W.Scene]:
    return W.scenes(n, split="test", seed=seed + EVAL_SEED, two=False)


@torch.no_grad()
def captioning(pipe, n: int, *, seed: int = 0) -> tuple[tuple[float, float, float], list[str]]:
    """[image][BOS] -> text, as trained: (colour, shape, both) correct on ``n`` single-shape held-out images."""
    singles = held_out_singles(n, seed)
    outs = generate_batch(pipe, [[s.render(), TokenIds(())] for s in singles], GREEDY)
    texts = [o.text.strip() for o in outs]
    colour = [first_match(_COLOUR_RE, t) == s.things[0].colour for t, s in zip(texts, singles, strict=True)]
    shape = [first_match(_SHAPE_RE, t) == s.things[0].shape for t, s in zip(texts, singles, strict=True)]
    both = [c and s for c, s in zip(colour, shape, strict=True)]
    samples = [f"{s.caption} -> {t}" for s, t in zip(singles[:6], texts[:6], strict=True)]
    return (_mean(colour), _mean(shape), _mean(both)), samples


@torch.no_grad()
def colour_question(pipe, n: int, *, seed: int = 0) -> tuple[float, list[str]]:
    """One shown image and "What colour is the shape?", through the chat template."""
    singles = held_out_singles(n, seed)
    outs = generate_batch(pipe, [[s.render(), "What colour is the shape?"] for s in singles], GREEDY, dialogue=True)
    answers = [o.text.strip() for o in outs]
    return _mean(
        [first_match(_COLOUR_RE, a) == s.things[0].colour for a, s in zip(answers, singles, strict=True)]
    ), answers[:6]


def comparison_dialogues(n: int, *, seed: int = 0) -> list[W.Dialogue]:
    """``n`` two-image yes/no questions over held-out scenes, balanced: the three kinds in turn, and "yes" the right
    answer for every other one (so always answering "no" scores 0.5)."""
    rng = np.random.default_rng([seed, EVAL_SEED])
    pool = held_out_singles(max(4 * n, 40), seed)
    out = []
    for i in range(n):
        kind, want = W.COMPARISONS[i % 3], i % 2 == 0
        while True:
            a, b = (pool[int(j)] for j in rng.choice(len(pool), 2, replace=False))
            if W.compare_answer(kind, a, b) == want:
                break
        out.append(W.compare_dialogue(a, b, rng, kind=kind))
    return out


@torch.no_grad()
def comparison(pipe, n: int, *, seed: int = 0) -> tuple[float, list[str]]:
    """Two shown images and a yes/no comparison, through the chat template: the answer's first word is right."""
    pairs = comparison_dialogues(n, seed=seed)
    prompts = [[*(s.render() for s in d.turns[0].images), d.turns[0].text] for d in pairs]
    outs = generate_batch(pipe, prompts, GREEDY, dialogue=True)
    answers = [o.text.strip().lower() for o in outs]
    return _mean(_yes_no_right(answers, pairs)), [
        f"{d.turns[0].text} -> {a}" for d, a in zip(pairs[:6], answers[:6], strict=True)
    ]


def _yes_no_right(answers: list[str], pairs: list[W.Dialogue]) -> list[bool]:
    return [
        a.split(" ")[0].rstrip(",.") == d.turns[1].text.split(",")[0].split(" ")[0].rstrip(",.")
        for a, d in zip(answers, pairs, strict=True)
    ]


@torch.no_grad()
def comparison_from_descriptions(pipe, n: int, *, seed: int = 0) -> float:
    """The same questions with each image written as its description, as the LM was pretrained (``(a red circle)
    (a blue square)<bos>Q: ...``): what the frozen LM can do when it is told what the images show."""
    from .pretrain import described, generate_text

    pairs = comparison_dialogues(n, seed=seed)
    tok = pipe.tokenizer
    answers = [
        generate_text(
            pipe.model.lm, tok, d.text(image=described, bos=tok.bos_token).split("\nA:")[0] + "\nA:", max_new_tokens=8
        )
        .strip()
        .lower()
        for d in pairs
    ]
    return _mean(_yes_no_right(answers, pairs))


def _mean(xs) -> float:
    return round(float(np.mean(xs)), 3) if len(xs) else 0.0


def retrieval_queries(
    scenes: list[W.Scene], *, seed: int = 0
) -> tuple[list[str], list[str], list[dict[str, bool]], list[str]]:
    """The retrieval measure's captions: each scene's complete caption, a partial one, which attributes the
    partial one names (``W.describe`` flags), and its description."""
    rng = np.random.default_rng([seed, EVAL_SEED, 1])
    flags = [
        dict(size=bool(rng.random() < 0.7), where=bool(rng.random() < 0.7), background=bool(rng.random() < 0.5))
        for _ in scenes
    ]
    bodies = [W.describe(s, **f) for s, f in zip(scenes, flags, strict=True)]

    def phrase(body: str) -> str:
        return W.CAPTION_TEMPLATES[int(rng.integers(len(W.CAPTION_TEMPLATES)))].format(body)

    partial = [phrase(b) for b in bodies]
    complete = [phrase(W.describe(s)) for s in scenes]
    return complete, partial, flags, bodies


@torch.no_grad()
def retrieval(pipe, scenes: list[W.Scene], *, seed: int = 0) -> dict[str, float]:
    """Caption -> image over ``scenes`` (a gallery whose scenes all differ). ``R@k``: queried with an image's
    complete caption, the image itself is in the top k (the usual measure). ``match@k``: queried with a partial
    caption (size, position or background often left out, as a user asks), the top k hold an image with every
    attribute it names; several gallery images may fit one."""
    m = pipe.model
    complete, partial, flags, bodies = retrieval_queries(scenes, seed=seed)
    text = m.text_embedding(image_token_states(pipe, complete + partial)[:, 0])
    pixels = m.vision.processor([s.render() for s in scenes]).to(m.device)
    image = m.image_embedding(m.encode_images(pixels))
    ranks = (text @ image.T).argsort(dim=1, descending=True).cpu()
    hit = ranks[: len(scenes)] == torch.arange(len(scenes))[:, None]
    fits = torch.tensor([[W.describe(o, **f) == b for o in scenes] for f, b in zip(flags, bodies, strict=True)])
    match = torch.gather(fits, 1, ranks[len(scenes) :])
    out = {f"R@{k}": round(float(hit[:, :k].any(1).float().mean()), 3) for k in (1, 5, 10)}
    out.update({f"match@{k}": round(float(match[:, :k].any(1).float().mean()), 3) for k in (1, 5, 10)})
    out["chance_R@1"] = round(1 / len(scenes), 4)
    out["chance_match@1"] = round(float(fits.float().mean()), 4)
    return out


@torch.no_grad()
def decision(pipe, n: int, *, seed: int = 0) -> float:
    from ..training.decision import LABELS

    prompts = W.decision_prompts(n, split="test", seed=seed + EVAL_SEED)
    hidden = image_token_states(pipe, [p for p, _ in prompts])[:, 0]
    pred = pipe.model.decide(hidden).argmax(-1).tolist()
    return _mean([p == LABELS[label] for p, (_, label) in zip(pred, prompts, strict=True)])


@torch.no_grad()
def requests(
    pipe, n: int, *, steps: int, guidance: float, clip_dir: str | Path | None, seed: int = 0
) -> tuple[dict[str, float], list[str]]:
    """What a user of the chat sees: ``n`` held-out "show me ..." and "draw ..." messages (half each) sent through
    ``Chat`` with the model's own default settings (mode auto) and its shipped gallery index. Per kind: the answer
    holds an image (``*_image``), from the right source: the gallery for "show", diffusion for "draw"
    (``*_routed``), showing the requested colour and shape (``*_match``: by the gallery's own record of the scene
    for "show"; by the dominant colour and ``shape_judge`` for "draw"). Also ``n/2`` shown held-out images with
    "What is in this image?": answered without an image (``describe_no_image``), naming colour and shape
    (``describe_right``), then asked "What colour is the shape?" in the same conversation (``follow_up_colour``).
    The first ``n/2`` requests again, typed with a lower-case first letter and without their closing full stop or
    question mark, answered with an image of the right source and the asked dominant colour (``typed_right``;
    ``plain_right`` the same for them as written). And ``n/6`` conversations of three such requests in a row: the
    second and third answered with an image of the right source and the asked dominant colour (``later_right``)."""
    _load_gallery(pipe)
    rng = np.random.default_rng([seed, EVAL_SEED, 3])
    targets = [s for s in W.gallery_scenes(len(pipe.index), seed) if len(s.things) == 1]
    fresh = W.scenes(n, split="test", seed=seed + EVAL_SEED + 2, two=False)
    asks = [
        W.show_dialogue(targets[int(rng.integers(len(targets)))], rng) if i % 2 == 0 else W.draw_dialogue(fresh[i], rng)
        for i in range(n)
    ]
    settings = GenerationSettings.for_model(
        pipe.config, seed=seed, num_inference_steps=steps, guidance_scale=guidance, max_new_tokens=24
    )
    shown: list[tuple[W.Dialogue, ImageResult | None]] = []
    samples = []
    for d in asks:
        events = list(Chat(pipe).send([d.turns[0].text], settings))
        image = next((e for e in events if isinstance(e, ImageResult)), None)
        shown.append((d, image))
        if len(samples) < 6:
            text = "".join(e.text for e in events if isinstance(e, TextDelta))
            samples.append(f"{d.turns[0].text} -> {text.strip()!r} + {image.source if image else 'no image'}")
    # And an image not asked for: "What is in this image?" about a shown image should be answered in words only.
    # Then, in the same conversation, "What colour is the shape?" about the image shown one message earlier
    described, followed = [], []
    for scene in held_out_singles(n // 2, seed):
        chat = Chat(pipe)
        events = list(chat.send([scene.render(), "What is in this image?"], settings))
        text = "".join(e.text for e in events if isinstance(e, TextDelta)).lower()
        described.append(
            (
                not any(isinstance(e, ImageResult) for e in events),
                scene.things[0].colour in text and scene.things[0].shape in text,
            )
        )
        events = list(chat.send(["What colour is the shape?"], settings))
        followed.append(
            first_match(_COLOUR_RE, "".join(e.text for e in events if isinstance(e, TextDelta)).lower())
            == scene.things[0].colour
        )
    # The same requests typed as people often type them: lower-case first letter, no closing full stop or "?"
    typed = []
    for d in asks[: max(1, n // 2)]:
        events = list(Chat(pipe).send([W.typed(d.turns[0].text)], settings))
        typed.append(_right_kind_and_colour(d, next((e for e in events if isinstance(e, ImageResult)), None)))
    # Requests later in a conversation: the earlier exchanges (their words and images) precede them
    later = []
    for c in range(max(1, n // 6)):
        chat = Chat(pipe)
        for turn in range(3):
            d = asks[(3 * c + turn) % len(asks)]  # alternately "show" and "draw"
            events = list(chat.send([d.turns[0].text], settings))
            if turn:
                later.append(_right_kind_and_colour(d, next((e for e in events if isinstance(e, ImageResult)), None)))
    # A gallery answer is right when the scene it shows is one shape of the asked colour and shape (the gallery's
    # own record, no judge); a drawing when its dominant colour is the asked one and the CLIP judge picks the shape
    gallery = W.gallery_scenes(len(pipe.index), seed)
    drawn = [(d, im) for d, im in shown if im is not None and im.source == "generated" and d.kind == "draw"]
    judged = dict(
        zip(
            (id(im) for _, im in drawn),
            shape_judge(_judge_dir(pipe, clip_dir), [im.image for _, im in drawn], [_target(d) for d, _ in drawn]),
            strict=True,
        )
    )

    def matches(d: W.Dialogue, im: ImageResult | None) -> bool:
        want = _target(d).things[0]
        if im is None or im.source != ("retrieved" if d.kind == "show" else "generated"):
            return False
        if d.kind == "show":
            assert im.index_id is not None, "a retrieved image names its gallery row"
            got = gallery[im.index_id].things
            if im.caption and not all(t.colour in im.caption and t.shape in im.caption for t in got):
                raise ValueError(
                    f"gallery image {im.index_id} is captioned {im.caption!r}, not as the toy gallery's "
                    f"scene: measure with the index `fromage-gill toy build` wrote for this model"
                )
            return len(got) == 1 and (got[0].colour, got[0].shape) == (want.colour, want.shape)
        return W.dominant_colour(im.image) == want.colour and judged[id(im)] == want.shape

    out = {}
    for kind, source in (("show", "retrieved"), ("draw", "generated")):
        rows = [(d, im) for d, im in shown if d.kind == kind]
        out[f"{kind}_image"] = _mean([im is not None for _, im in rows])
        out[f"{kind}_routed"] = _mean([im is not None and im.source == source for _, im in rows])
        out[f"{kind}_match"] = _mean([matches(d, im) for d, im in rows])
        out[f"{kind}_n"] = len(rows)
    out["describe_no_image"] = _mean([quiet for quiet, _ in described])
    out["describe_right"] = _mean([right for _, right in described])
    out["describe_n"] = len(described)
    out["follow_up_colour"] = _mean(followed)
    out["typed_right"] = _mean(typed)
    out["plain_right"] = _mean([_right_kind_and_colour(d, im) for d, im in shown[: len(typed)]])  # as written
    out["typed_n"] = len(typed)
    out["later_right"] = _mean(later)
    out["later_n"] = len(later)
    return out, samples


def _load_gallery(pipe) -> None:
    """The model's shipped gallery index as ``pipe.index``, unless it has one: what a chat retrieves from."""
    if pipe.index is None:
        from ..retrieve import ImageIndex, shipped_index_dir

        shipped = shipped_index_dir(pipe.config.name)
        if shipped is None:
            raise FileNotFoundError(f"no gallery index for {pipe.config.name}: build it (fromage-gill toy build)")
        pipe.index = ImageIndex.load(shipped, expected_fingerprint=pipe.model.retrieval_fingerprint())


def _target(d: W.Dialogue) -> W.Scene:
    """The scene a "show" / "draw" dialogue asks for (its second turn's)."""
    target = d.turns[1].target
    assert target is not None, "a show / draw dialogue's answer shows a scene"
    return target


def _right_kind_and_colour(d: W.Dialogue, image: ImageResult | None) -> bool:
    """A "show" / "draw" request answered with an image from the right source, of the asked dominant colour."""
    return (
        image is not None
        and image.source == ("retrieved" if d.kind == "show" else "generated")
        and W.dominant_colour(image.image) == _target(d).things[0].colour
    )


def shape_judge(clip_dir: str | Path, images: list, requested: list[W.Scene]) -> list[str]:
    """The small CLIP's pick among the world's six shapes for each image: the request's own description
    (``W.describe`` without position) with each shape in turn, so the captions differ only in the shape. On real
    held-out one-shape images this picks the right shape more often than bare "a circle" ... prompts (0.86 against
    0.78 over 600; ``benchmarks/bench_toy_limits.py``), which called most drawn diamonds circles."""
    from transformers import AutoTokenizer, CLIPModel

    from .pretrain import clip_embed_images, clip_embed_texts

    if not images:
        return []
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    texts = [
        W.describe(dataclasses.replace(scene, things=(dataclasses.replace(scene.things[0], shape=shape),)), where=False)
        for scene in requested
        for shape in W.SHAPES
    ]
    captions = clip_embed_texts(clip, tok, texts).view(len(requested), len(W.SHAPES), -1)
    pixels = torch.from_numpy(
        np.stack([np.asarray(im.convert("RGB").resize((W.IMAGE_SIZE, W.IMAGE_SIZE))) for im in images])
    ).permute(0, 3, 1, 2)
    pred = (captions @ clip_embed_images(clip, pixels)[:, :, None]).squeeze(-1).argmax(1).tolist()
    return [W.SHAPES[p] for p in pred]


def _judge_dir(pipe, clip_dir: str | Path | None) -> Path:
    from ..paths import checkout_path

    return Path(clip_dir or checkout_path(pipe.config.vision.source))


@torch.no_grad()
def drawings(
    pipe, n: int, *, steps: int, guidance: float, seed: int = 0
) -> tuple[list[W.Scene], list[Image.Image], list[Image.Image]]:
    """The generation measure's ``n`` held-out one-shape requests (``W.describe`` without position) and their
    images: GILL's ([IMG] tokens -> GILLMapper -> diffusion) and the diffusion stack's from its own text encoder."""
    from ..generate.diffusion import image_generator

    targets = W.scenes(n, split="test", seed=seed + EVAL_SEED + 1, two=False)
    prompts = [W.describe(s, where=False) for s in targets]
    gen = image_generator(pipe)
    ours, alone = [], []
    sd = pipe.diffusion
    sd.set_progress_bar_config(disable=True)
    for lo in range(0, n, 12):
        batch = prompts[lo : lo + 12]
        embeds = pipe.model.map_to_diffusion(image_token_states(pipe, batch))
        ours += gen(embeds, guidance_scale=guidance, num_inference_steps=steps, seed=seed + lo).images
        alone += sd(
            batch,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + lo),
            height=W.IMAGE_SIZE,
            width=W.IMAGE_SIZE,
        ).images
    return targets, ours, alone


def generation(
    pipe, n: int, *, steps: int, guidance: float, clip_dir: str | Path | None, seed: int = 0
) -> dict[str, float]:
    """Dominant colour and CLIP shape accuracy of GILL's images and of the diffusion stack's own text path."""
    targets, ours, alone = drawings(pipe, n, steps=steps, guidance=guidance, seed=seed)
    shapes = shape_judge(_judge_dir(pipe, clip_dir), ours + alone, targets + targets)
    out = {}
    for name, images, judged in (("gill", ours, shapes[:n]), ("diffusion_alone", alone, shapes[n:])):
        colour = [W.dominant_colour(im) == s.things[0].colour for im, s in zip(images, targets, strict=True)]
        shape = [j == s.things[0].shape for j, s in zip(judged, targets, strict=True)]
        out[f"{name}_colour"], out[f"{name}_shape"] = _mean(colour), _mean(shape)
    return out


_NEGATION_RE = re.compile(r"\b(not|no|nothing|none|isn't|doesn't|don't|can't|cannot)\b")
_PAIR_RE = re.compile(_COLOUR_RE.pattern + r"(?:\W+\w+){0,2}?\W+" + _SHAPE_RE.pattern)  # "red circle", "red big ring"


def describes_drawing(answer: str, colour: str | None, shape: str | None) -> tuple[bool, bool]:
    """(colour right, both right): the answer's first colour word and first shape word, as captioning is scored."""
    right = first_match(_COLOUR_RE, answer.lower()) == colour
    return right, right and first_match(_SHAPE_RE, answer.lower()) == shape


def answers_out_of_world(answer: str) -> bool:
    """An image from outside the world answered as such: the answer names no colour-and-shape pair (a colour word
    followed within three words by a shape word: "a red circle", "a large red ring") or says no ("not", "nothing",
    "isn't", ...). "it is red." passes, "a small red circle on the left." fails: the model made up a shape."""
    return _PAIR_RE.search(answer.lower()) is None or _NEGATION_RE.search(answer.lower()) is not None


@torch.no_grad()
def describe_drawings(
    pipe, directory: str | Path = D.DRAWINGS_DIR, *, steps: int, guidance: float, seed: int = 0
) -> tuple[dict[str, float], list[str]]:
    """ "What is in this image?" about each image of the drawings set in ``directory``, in a new ``Chat`` each, as
    ``requests`` asks it: drawings named with the right ``colour`` / colour and shape (``both``) over ``n``;
    out-of-world images answered as such over ``out_of_world_n``; no image in the answer over ``no_image_n``."""
    _load_gallery(pipe)
    settings = GenerationSettings.for_model(
        pipe.config, seed=seed, num_inference_steps=steps, guidance_scale=guidance, max_new_tokens=24
    )
    named, outside, quiet, samples = [], [], [], []
    for ex in D.load(directory):
        events = list(Chat(pipe).send([D.open_image(directory, ex), "What is in this image?"], settings))
        text = "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
        quiet.append(not any(isinstance(e, ImageResult) for e in events))
        if ex.kind == "drawing":
            named.append(describes_drawing(text, ex.colour, ex.shape))
        else:
            outside.append(answers_out_of_world(text))
        if len(samples) < 6 or (ex.kind == "out_of_world" and len(samples) < 12):
            samples.append(f"{ex.file} -> {text!r}")
    out = {"colour": _mean([c for c, _ in named]), "both": _mean([b for _, b in named]), "n": len(named)}
    out.update(out_of_world=_mean(outside), out_of_world_n=len(outside), no_image=_mean(quiet), no_image_n=len(quiet))
    return out, samples
