"""``fromage-gill toy eval``'s long conversations: does the last turn of a long conversation behave like the first?

Scored with the toy evaluation's own judges (``evaluate``); over the drawings set and the world's gallery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate import Chat, GenerationSettings, ImageResult, TextDelta
from . import drawings as D
from . import world as W
from .evaluate import (
    EVAL_SEED,
    _judge_dir,
    _load_gallery,
    _mean,
    _target,
    answers_out_of_world,
    describes_drawing,
    shape_judge,
)

LONG_KINDS = ("describe", "out_of_world", "show", "draw")
_REPEAT_RE = re.compile(r"\b(\w+)\W+\1\W+\1\b", re.IGNORECASE)  # one word three times in a row
# An answer that speaks as the user: it asks for a picture or asks a question, as only the user's turns do
_AS_USER_RE = re.compile(r"^\W*(q:|can you|could you|draw|show me|make me|find|describe|what|where|is |are )", re.I)


def repeats_a_word(answer: str) -> bool:
    """ "the the the yellow circle": one word three times in a row."""
    return _REPEAT_RE.search(answer) is not None


def speaks_as_user(answer: str) -> bool:
    """The answer is worded as the user's turn ("Draw a new picture of ...", "Can you ...", "Q: ...")."""
    return _AS_USER_RE.search(answer) is not None


@dataclass
class _Asked:
    kind: str  # one of LONG_KINDS
    message: list  # what the user sends: [image, text] or [text]
    example: D.Example | None = None  # describe / out_of_world: the drawings set's image
    dialogue: W.Dialogue | None = None  # show / draw: the world's request


@torch.no_grad()
def long_conversations(
    pipe,
    directory: str | Path = D.DRAWINGS_DIR,
    *,
    conversations: int,
    turns: int = 20,
    steps: int,
    guidance: float,
    clip_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], list[str]]:
    """Does the last turn of a long conversation behave like the first? ``conversations`` conversations of
    ``turns`` turns through one ``Chat`` each, with the model's own settings. Conversation ``c`` asks the same kind
    of thing at its first and its last turn (``LONG_KINDS[c % 4]``: describe a drawing of the drawings set, answer
    an out-of-world image of it, "show me ..." from the gallery, "draw ..."), and every kind in turn in between.
    Per kind and figure, the share right at the first turn (``*_first``) and at the last (``*_last``):
    ``describe_both`` (colour and shape named), ``describe_no_image`` (no image not asked for),
    ``out_of_world`` (answered as such), ``show_match`` / ``draw_colour`` / ``draw_shape`` (as ``requests`` judges
    them), ``routed`` (show retrieved, draw generated). Over every answer of every turn: ``repeats`` (a word three
    times in a row) and ``as_user`` (worded as a user's turn)."""
    _load_gallery(pipe)
    examples = D.load(directory)
    pools = {
        "describe": [e for e in examples if e.kind == "drawing"],
        "out_of_world": [e for e in examples if e.kind == "out_of_world"],
    }
    rng = np.random.default_rng([seed, EVAL_SEED, 7])
    targets = [s for s in W.gallery_scenes(len(pipe.index), seed) if len(s.things) == 1]
    fresh = W.scenes(max(turns * conversations, 8), split="test", seed=seed + EVAL_SEED + 4, two=False)
    counter = {k: 0 for k in LONG_KINDS}

    def ask(kind: str) -> _Asked:
        i = counter[kind]
        counter[kind] += 1
        if kind in pools:
            ex = pools[kind][(i * 7 + seed) % len(pools[kind])]  # a stride: consecutive asks differ in colour and shape
            return _Asked(kind, [D.open_image(directory, ex), "What is in this image?"], example=ex)
        if kind == "show":
            d = W.show_dialogue(targets[int(rng.integers(len(targets)))], rng)
        else:
            d = W.draw_dialogue(fresh[i % len(fresh)], rng)
        return _Asked(kind, [d.turns[0].text], dialogue=d)

    settings = GenerationSettings.for_model(
        pipe.config, seed=seed, num_inference_steps=steps, guidance_scale=guidance, max_new_tokens=24
    )
    record: list[tuple[str, _Asked, str, ImageResult | None]] = []  # (first / middle / last, asked, text, image)
    answers, samples = [], []
    for c in range(conversations):
        probe = LONG_KINDS[c % len(LONG_KINDS)]
        chat = Chat(pipe)
        for t in range(turns):
            where = "first" if t == 0 else "last" if t == turns - 1 else "middle"
            asked = ask(probe if where != "middle" else LONG_KINDS[(c + t) % len(LONG_KINDS)])
            events = list(chat.send(asked.message, settings))
            text = "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
            image = next((e for e in events if isinstance(e, ImageResult)), None)
            record.append((where, asked, text, image))
            answers.append(text)
            if c < 2 and where != "middle":
                samples.append(f"conversation {c} turn {t + 1}: {asked.message[-1]} -> {text!r}")
    drawn = [(a, im) for _, a, _, im in record if a.kind == "draw" and im is not None and im.source == "generated"]
    judged = dict(
        zip(
            (id(im) for _, im in drawn),
            shape_judge(
                _judge_dir(pipe, clip_dir),
                [im.image for _, im in drawn],
                [_target(a.dialogue) for a, _ in drawn if a.dialogue is not None],
            ),
            strict=True,
        )
    )
    gallery = W.gallery_scenes(len(pipe.index), seed)

    def figures(asked: _Asked, text: str, image: ImageResult | None) -> dict[str, bool]:
        if asked.kind == "describe":
            assert asked.example is not None
            return {
                "describe_both": describes_drawing(text, asked.example.colour, asked.example.shape)[1],
                "describe_no_image": image is None,
            }
        if asked.kind == "out_of_world":
            return {"out_of_world": answers_out_of_world(text), "out_of_world_no_image": image is None}
        assert asked.dialogue is not None
        want = _target(asked.dialogue).things[0]
        source = "retrieved" if asked.kind == "show" else "generated"
        routed = image is not None and image.source == source
        if asked.kind == "show":
            got = gallery[image.index_id].things if routed and image is not None and image.index_id is not None else ()
            right = len(got) == 1 and (got[0].colour, got[0].shape) == (want.colour, want.shape)
            return {"routed": routed, "show_match": right}
        return {
            "routed": routed,
            "draw_colour": routed and image is not None and W.dominant_colour(image.image) == want.colour,
            "draw_shape": routed and image is not None and judged.get(id(image)) == want.shape,
        }

    out: dict[str, float] = {"conversations": conversations, "turns": turns}
    for where in ("first", "last"):
        scored: dict[str, list[bool]] = {}
        for w, asked, text, image in record:
            if w == where:
                for name, ok in figures(asked, text, image).items():
                    scored.setdefault(name, []).append(ok)
        for name, oks in scored.items():
            out[f"{name}_{where}"] = _mean(oks)
            out[f"{name}_n"] = len(oks)
    out["repeats"] = _mean([repeats_a_word(a) for a in answers])
    out["as_user"] = _mean([speaks_as_user(a) for a in answers])
    out["answers"] = len(answers)
    return out, samples
