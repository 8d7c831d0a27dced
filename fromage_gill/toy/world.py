"""The toy world: seeded 64x64 images of one or two flat shapes, their captions and dialogues that use them.

Everything is a pure function of a seed (numpy's PCG64 and integer arithmetic on a pixel grid; no fonts, no
anti-aliasing, no Python ``hash``), so the world is the same on every machine. A scene is split into "train" or
"test" by a content hash of its attributes (``Scene.key``): held-out scenes are attribute combinations that
never occur in training, while every single attribute (colour, shape, ...) does.

Vocabulary: 6 shapes x 6 colours x 2 sizes x 5 positions x 3 backgrounds for one shape; two shapes side by
side ("to the left of") or stacked ("above") for a pair.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ..retrieve.sources import escape_text

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
RELATIONS = ("left of", "above")

_RADIUS = {"small": 9, "large": 16}  # one shape: radius in pixels (before jitter)
_PAIR_RADIUS = {"small": 8, "large": 13}  # two shapes: smaller, so they never touch
_CENTRES = {"center": (32, 32), "left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46)}
_POSITION_WORDS = {
    "center": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
HELD_OUT_PERCENT = 10  # share of attribute combinations that only occur in the "test" split

Split = Literal["train", "test"]


# ------------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Thing:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def phrase(self, *, size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image shows. One thing at ``position``, or two: ``things[0]`` is ``relation`` ``things[1]``.
    ``variant`` seeds the pixel-level jitter (exact position, shade, noise), so many images share a scene key."""

    things: tuple[Thing, ...]
    background: str
    position: str | None = None  # one thing only
    relation: str | None = None  # two things only
    variant: int = 0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if len(self.things) == 1:
            if self.position not in POSITIONS or self.relation is not None:
                raise ValueError(f"a one-shape scene needs position in {POSITIONS} and no relation")
        elif len(self.things) == 2:
            if self.relation not in RELATIONS or self.position is not None:
                raise ValueError(f"a two-shape scene needs relation in {RELATIONS} and no position")
        else:
            raise ValueError(f"a scene has one or two things, got {len(self.things)}")

    @property
    def key(self) -> str:
        """The attributes without the pixel variant: what a caption can say about the image."""
        things = "+".join(f"{t.size}-{t.colour}-{t.shape}" for t in self.things)
        return f"{things}|{self.position or self.relation}|{self.background}"

    @property
    def split(self) -> Split:
        digest = hashlib.sha256(self.key.encode()).digest()
        return "test" if int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT else "train"

    @property
    def caption(self) -> str:
        """The canonical, complete caption (the evaluation's reference)."""
        return describe(self)

    def render(self) -> Image.Image:
        return render(self)


def distinct_scenes(n: int, *, split: Split, seed: int) -> list[Scene]:
    """``n`` scenes of ``split`` with ``n`` different keys (so a complete caption names exactly one of them): the
    first occurrence of each key among ``4 n`` seeded draws, in order."""
    pool = scenes(4 * n, split=split, seed=seed)
    seen: set[str] = set()
    unique = [s for s in pool if not (s.key in seen or seen.add(s.key))]
    if len(unique) < n:
        raise ValueError(
            f"the {split} split has only {len(unique)} different scenes in {len(pool)} draws; ask for at most that many"
        )
    return unique[:n]


def _position(scene: Scene) -> str:
    position = scene.position
    assert position is not None, "a one-shape scene has a position (Scene checks it)"
    return position


def describe(scene: Scene, *, size: bool = True, where: bool = True, background: bool = True) -> str:
    """A caption naming every attribute that is asked for; colour and shape are always named."""
    if len(scene.things) == 1:
        text = f"a {scene.things[0].phrase(size=size)}"
        if where:
            text += f" {_POSITION_WORDS[_position(scene)]}"
    else:
        a, b = (t.phrase(size=size) for t in scene.things)
        text = f"a {a} to the left of a {b}" if scene.relation == "left of" else f"a {a} above a {b}"
    if background:
        text += f" on a {scene.background} background"
    return text


def sample_scene(rng: np.random.Generator, *, two: bool | None = None) -> Scene:
    """One scene with uniformly drawn attributes (two shapes with probability 0.3 unless ``two`` is given)."""
    two = bool(rng.random() < 0.3) if two is None else two

    def thing() -> Thing:
        return Thing(
            SHAPES[rng.integers(len(SHAPES))],
            list(COLOURS)[rng.integers(len(COLOURS))],
            SIZES[rng.integers(len(SIZES))],
        )

    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    variant = int(rng.integers(2**31))
    if two:
        first = thing()
        second = thing()
        while second.colour == first.colour and second.shape == first.shape:  # the caption must tell them apart
            second = thing()
        return Scene((first, second), background, relation=RELATIONS[rng.integers(len(RELATIONS))], variant=variant)
    return Scene((thing(),), background, position=POSITIONS[rng.integers(len(POSITIONS))], variant=variant)


def scenes(n: int, *, split: Split, seed: int, two: bool | None = None) -> list[Scene]:
    """``n`` scenes of ``split``: the same list for the same arguments on every machine."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    # Different splits draw from different streams so that asking for more test scenes never shifts train ones.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, two=two)
        if scene.split == split:
            out.append(scene)
    return out


# ------------------------------------------------------------------------------------------------ pixels


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside ``shape`` in coordinates normalised by its radius (u right, v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image: flat shapes on a flat background, with per-image jitter of position,
    size and shade and a little pixel noise, so that a model must look rather than memorise pixels."""
    rng = np.random.default_rng([scene.variant, 7])
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    img[:] = _jitter_colour(BACKGROUNDS[scene.background], rng, 10)
    if len(scene.things) == 1:
        cx, cy = _CENTRES[_position(scene)]
        placed = [(scene.things[0], cx, cy, _RADIUS[scene.things[0].size])]
    else:
        a, b = scene.things
        (ax, ay), (bx, by) = ((17, 32), (47, 32)) if scene.relation == "left of" else ((32, 17), (32, 47))
        placed = [(a, ax, ay, _PAIR_RADIUS[a.size]), (b, bx, by, _PAIR_RADIUS[b.size])]
    for thing, cx, cy, radius in placed:
        cx += rng.integers(-3, 4)
        cy += rng.integers(-3, 4)
        radius += rng.integers(-1, 2)
        inside = _mask(thing.shape, (x - cx) / radius, (y - cy) / radius)
        img[inside] = _jitter_colour(COLOURS[thing.colour], rng, 18)
    img += rng.normal(0.0, 4.0, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float64) + rng.integers(-amount, amount + 1, 3), 0, 255)


def dominant_colour(image: Image.Image) -> str | None:
    """The palette colour (``COLOURS``) covering most pixels that are not background-coloured, or None if
    no pixel is near any palette colour. How the evaluation reads the colour of a generated image."""
    arr = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float64).reshape(-1, 3)
    names = list(COLOURS) + list(BACKGROUNDS)
    palette = np.asarray([COLOURS[n] for n in COLOURS] + [BACKGROUNDS[n] for n in BACKGROUNDS])
    dist = ((arr[:, None, :] - palette[None, :, :]) ** 2).sum(-1)  # (pixels, palette)
    nearest = dist.argmin(1)
    close = dist[np.arange(len(arr)), nearest] < 60.0**2
    counts = np.bincount(nearest[close], minlength=len(names))[: len(COLOURS)]
    return names[int(counts.argmax())] if counts.max() > 0 else None


# ------------------------------------------------------------------------------------------------ captions


def captions(scene: Scene, rng: np.random.Generator, k: int = 1) -> list[str]:
    """``k`` varied captions of ``scene``: each names colour and shape, and a random subset of the rest."""
    out = []
    for _ in range(k):
        body = describe(
            scene, size=bool(rng.random() < 0.7), where=bool(rng.random() < 0.7), background=bool(rng.random() < 0.5)
        )
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        out.append(template.format(body))
    return out


CAPTION_TEMPLATES = ("{}", "{}", "a picture of {}", "a photo of {}", "an image of {}", "a drawing of {}", "there is {}")


# ------------------------------------------------------------------------------------------------ dialogue

Output = Literal["retrieve", "generate"]


@dataclass(frozen=True)
class Turn:
    """One chat turn. A user turn may show images (before its text); an assistant turn may end in an image,
    retrieved from the gallery (``output='retrieve'``) or generated (``'generate'``), showing ``target``."""

    role: Literal["user", "assistant"]
    text: str
    images: tuple[Scene, ...] = ()
    output: Output | None = None
    target: Scene | None = None


@dataclass(frozen=True)
class Dialogue:
    kind: Literal["describe", "compare", "show", "draw"]
    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def text(
        self,
        image: Callable[[Scene], str],
        output: Callable[[Output], str] = lambda o: "",
        *,
        user_prefix: str = "Q: ",
        assistant_prefix: str = "\nA:",
        turn_separator: str = "\n",
        bos: str = "",
    ) -> str:
        """The dialogue as LM text, laid out as the chat engine lays it out (``prompt.dialogue_pieces``): a user
        turn's images go *before* ``user_prefix`` (``[images] Q: ...\nA: ...``) and ``bos`` is put once, before
        the first text, so a first turn that shows images reads ``[images] <bos>Q: ...``. ``image`` renders a
        shown image (visual-token placeholders, or its description for a text-only LM); ``output`` renders the
        image the assistant answers with (e.g. ``[RET]``)."""
        text = ""
        for i, turn in enumerate(self.turns):
            if turn.role == "user":
                shown = "".join(image(s) for s in turn.images)
                text += (turn_separator if i else "") + shown + (bos if not text else "") + user_prefix + turn.text
            else:
                text += (bos if not text else "") + f"{assistant_prefix} {turn.text}"
                text += output(turn.output) if turn.output else ""
        return text


def describe_dialogue(scene: Scene, rng: np.random.Generator) -> Dialogue:
    thing = scene.things[0]
    question, answer = [
        ("What is in this image?", f"{describe(scene, background=False)}."),
        ("Describe the picture.", f"{describe(scene)}."),
        ("What colour is the shape?", f"it is {thing.colour}."),
        ("What shape is this?", f"it is a {thing.shape}."),
        (
            "Where is the shape?",
            f"it is {_POSITION_WORDS[scene.position]}."
            if scene.position
            else f"the {scene.things[0].phrase(size=False)} is {scene.relation} "
            f"the {scene.things[1].phrase(size=False)}.",
        ),
    ][rng.integers(5) if len(scene.things) == 1 else int(rng.choice([0, 1, 4]))]
    return Dialogue("describe", (Turn("user", question, (scene,)), Turn("assistant", answer)))


COMPARISONS = ("colour", "shape", "bigger")


def compare_answer(kind: str, a: Scene, b: Scene) -> bool:
    """The true answer to comparison ``kind`` (one of ``COMPARISONS``) about one-shape scenes ``a`` and ``b``."""
    ta, tb = a.things[0], b.things[0]
    return {
        "colour": ta.colour == tb.colour,
        "shape": ta.shape == tb.shape,
        "bigger": ta.size == "large" and tb.size == "small",
    }[kind]


def compare_dialogue(a: Scene, b: Scene, rng: np.random.Generator, kind: str | None = None) -> Dialogue:
    """Two one-shape images and a yes/no question about them (``kind``, else drawn from ``rng``); the answer starts
    with "yes" or "no"."""
    ta, tb = a.things[0], b.things[0]
    k = COMPARISONS.index(kind) if kind is not None else int(rng.integers(3))
    if k == 0:
        same = ta.colour == tb.colour
        q = "Are these the same colour?"
        a_ = f"yes, both are {ta.colour}." if same else f"no, the first is {ta.colour} and the second is {tb.colour}."
    elif k == 1:
        same = ta.shape == tb.shape
        q = "Are these the same shape?"
        a_ = f"yes, both are {ta.shape}s." if same else f"no, the first is a {ta.shape} and the second is a {tb.shape}."
    else:
        q = "Is the first shape bigger than the second?"
        bigger = ta.size == "large" and tb.size == "small"
        a_ = "yes, the first is bigger." if bigger else "no, it is not bigger."
    return Dialogue("compare", (Turn("user", q, (a, b)), Turn("assistant", a_)))


def show_dialogue(target: Scene, rng: np.random.Generator, detail: dict[str, bool] | None = None) -> Dialogue:
    """Ask for a photo: the answer is an image that exists (retrieved from the gallery). ``detail``: which
    attributes the request names (``describe``'s flags; default: drawn from ``rng``, position never)."""
    wanted = (
        describe(target, **detail)
        if detail is not None
        else describe(target, size=bool(rng.random() < 0.5), where=False, background=bool(rng.random() < 0.5))
    )
    ask = _SHOW_TEMPLATES[rng.integers(len(_SHOW_TEMPLATES))].format(wanted)
    return Dialogue(
        "show",
        (Turn("user", ask), Turn("assistant", f"here is a photo of {wanted}.", output="retrieve", target=target)),
    )


def draw_dialogue(target: Scene, rng: np.random.Generator, detail: dict[str, bool] | None = None) -> Dialogue:
    """Ask for a new picture: the answer is generated, not retrieved. ``detail`` as for ``show_dialogue`` (default:
    drawn from ``rng``, background always)."""
    wanted = (
        describe(target, **detail)
        if detail is not None
        else describe(target, size=bool(rng.random() < 0.5), where=bool(rng.random() < 0.5), background=True)
    )
    ask = _DRAW_TEMPLATES[rng.integers(len(_DRAW_TEMPLATES))].format(wanted)
    return Dialogue(
        "draw",
        (Turn("user", ask), Turn("assistant", f"here is a drawing of {wanted}.", output="generate", target=target)),
    )


_SHOW_TEMPLATES = ("Show me a photo of {}.", "Can you show me a picture of {}?", "Find an image of {}.", "Show me {}.")
_DRAW_TEMPLATES = ("Draw a new picture of {}.", "Can you draw {}?", "Make me a new image of {}.", "Draw {}.")


def dialogues(n: int, *, split: Split, seed: int, gallery: Sequence[Scene] | None = None) -> list[Dialogue]:
    """``n`` dialogues over ``split`` scenes, the four kinds in equal shares. "show" targets come from
    ``gallery`` when given (the images a retrieval index holds); "draw" targets are fresh scenes."""
    rng = np.random.default_rng([seed, 2 if split == "train" else 3])
    pool = scenes(max(4 * n, 8), split=split, seed=seed + 1)
    singles = [s for s in pool if len(s.things) == 1]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(describe_dialogue(pool[rng.integers(len(pool))], rng))
        elif kind == 1:
            out.append(compare_dialogue(singles[rng.integers(len(singles))], singles[rng.integers(len(singles))], rng))
        elif kind == 2:
            source = gallery if gallery else pool
            out.append(show_dialogue(source[int(rng.integers(len(source)))], rng))
        else:
            out.append(draw_dialogue(pool[rng.integers(len(pool))], rng))
    return out


# ------------------------------------------------------------------------------------------------ files


def answer_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption worded as the chat's answer to "show me" / "draw" (``here is a photo of ...``)."""
    d = show_dialogue(scene, rng) if rng.random() < 0.5 else draw_dialogue(scene, rng)
    return d.turns[1].text


def described_prompt(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A chat question about a shown image whose answer is a description, laid out as the chat engine lays out a
    user turn up to the answer (``Q: ...\\nA:``), and that answer: a captioning prompt and its caption."""
    question, answer = [
        ("What is in this image?", describe(scene, background=False)),
        ("Describe the picture.", describe(scene)),
    ][int(rng.integers(2))]
    return f"Q: {question}\nA:", f"{answer}."


def export_captions(
    directory: str | Path,
    items: Sequence[Scene],
    *,
    seed: int,
    captions_per_image: int = 1,
    answer_share: float = 0.0,
    prompt_share: float = 0.0,
    progress: Callable[[Iterator[tuple[int, Scene]]], Iterable[tuple[int, Scene]]] = iter,
) -> Path:
    """Write ``items`` as PNGs plus a CC3M-style ``captions.tsv`` (``caption<TAB>image``, image relative to
    ``directory``): the format ``fromage-gill train --data`` reads. With ``answer_share``, that share of the images
    also gets a ``query`` column worded as a chat answer (``answer_caption``): the text their [RET]/[IMG] tokens
    follow in training, while captioning keeps the caption. With ``prompt_share``, that share of the images is
    captioned as the answer to a chat question about it (``described_prompt``): a ``prompt`` column holds the
    question, read before the caption in the captioning loss, so the visual tokens also learn in a chat's layout.
    Returns the TSV path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 4])
    # Their own streams: with a share of 0 a column is absent and the rest is what it always was
    answers = np.random.default_rng([seed, 7])
    prompts = np.random.default_rng([seed, 8])
    tsv = directory / "captions.tsv"
    with open(tsv, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["caption", "image"] + ["query"] * bool(answer_share) + ["prompt"] * bool(prompt_share))
        for i, scene in progress(enumerate(items)):
            name = f"images/{i:06d}.png"
            scene.render().save(directory / name)
            for caption in captions(scene, rng, captions_per_image):
                row = [caption, name]
                if answer_share:  # an empty query: the caption is the query
                    row.append(answer_caption(scene, answers) if answers.random() < answer_share else "")
                if prompt_share:
                    prompt = ""
                    if prompts.random() < prompt_share:
                        prompt, row[0] = described_prompt(scene, prompts)
                        prompt = escape_text(prompt)  # a TSV row holds no newline: the reader unescapes it
                    row.append(prompt)
                writer.writerow(row)
    return tsv


def typed(text: str, *, lower: bool = True, unmarked: bool = True) -> str:
    """``text`` as people often type a chat message: with a lower-case first letter (``lower``), without its
    closing full stop or question mark (``unmarked``). The world's own requests are always written out properly."""
    if lower:
        text = text[:1].lower() + text[1:]
    if unmarked and text[-1:] in (".", "?"):
        text = text[:-1]
    return text


def decision_prompts(n: int, *, split: Split, seed: int, earlier_share: float = 0.0) -> list[tuple[str, Output]]:
    """Labelled prompts for GILL's retrieve-or-generate decision head: (text, 'retrieve' | 'generate'). The text
    is the exchange as the chat engine lays it out up to the image (``Q: ...\nA: here is ...``): the decision
    head reads the hidden state at [IMG0], which in a chat comes after the answer's words. A share
    ``earlier_share`` comes after an earlier "show" or "draw" exchange (its answer's words only, as the toy presets
    keep it in the prompt): later in a chat the head reads the state after both, and must follow the last request."""
    rng = np.random.default_rng([seed, 5 if split == "train" else 6])
    earlier = np.random.default_rng([seed, 9 if split == "train" else 10])  # its own stream: share 0 is unchanged
    pool = scenes(n, split=split, seed=seed + 2)
    out: list[tuple[str, Output]] = []
    for i, scene in enumerate(pool):
        # Both kinds name the same attributes equally often: only the request tells them apart (in the dialogues a
        # drawing always names its background, which a head would otherwise learn instead of "draw")
        detail = {k: bool(rng.random() < 0.5) for k in ("size", "where", "background")}
        d = show_dialogue(scene, rng, detail) if i % 2 == 0 else draw_dialogue(scene, rng, detail)
        label = d.turns[1].output
        assert label is not None, "a show / draw answer is retrieved or generated"
        if earlier_share and earlier.random() < earlier_share:
            before = scenes(1, split=split, seed=int(earlier.integers(2**31)))[0]
            first = show_dialogue(before, earlier) if earlier.random() < 0.5 else draw_dialogue(before, earlier)
            d = Dialogue(d.kind, first.turns + d.turns)
        text = d.text(image=lambda _: "")
        # In a chat the model may emit [IMG0] before its closing full stop as well as after it: train on both.
        out.append((text[:-1] if rng.random() < 0.5 else text, label))
    return out


GALLERY_SEED = 90  # offset from the recipe seed: the gallery's held-out scenes


def gallery_scenes(n: int, seed: int = 0) -> list[Scene]:
    """The held-out scenes the gallery index holds (the "show me" answers come from these): ``n`` scenes with
    ``n`` different complete captions, so a complete caption names exactly one gallery image."""
    return distinct_scenes(n, split="test", seed=seed + GALLERY_SEED)
