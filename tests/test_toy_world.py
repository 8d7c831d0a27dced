"""The toy world: deterministic, its captions say what its images show, its held-out split is disjoint."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromage_gill.toy import world as W


def _pixels_digest(scenes: list[W.Scene]) -> str:
    h = hashlib.sha256()
    for s in scenes:
        h.update(s.render().tobytes())
    return h.hexdigest()[:16]


def test_same_world_for_the_same_seed():
    a = W.scenes(50, split="train", seed=3)
    b = W.scenes(50, split="train", seed=3)
    assert a == b
    assert _pixels_digest(a) == _pixels_digest(b)
    assert W.scenes(50, split="train", seed=4) != a
    # More test scenes never shift the train ones (separate streams).
    assert W.scenes(10, split="test", seed=3) == W.scenes(20, split="test", seed=3)[:10]


def test_world_is_pinned_across_machines():
    """Golden values: the world is integer/IEEE arithmetic on numpy's PCG64, so these hold on every machine.
    If this fails after an intended change to the world, every toy checkpoint must be rebuilt."""
    scenes = W.scenes(3, split="train", seed=0)
    assert [s.caption for s in scenes] == [
        "a small red square in the middle on a gray background",
        "a large yellow diamond at the top on a gray background",
        "a large purple square in the middle on a gray background",
    ]
    assert _pixels_digest(scenes) == GOLDEN_PIXELS


GOLDEN_PIXELS = "1374c0662a159db5"


def _foreground(img: Image.Image, scene: W.Scene) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    bg = np.asarray(W.BACKGROUNDS[scene.background], dtype=np.float64)
    return ((arr - bg) ** 2).sum(-1) > 60.0**2  # (64, 64): pixels far from the background colour


def test_dominant_colour_matches_the_caption():
    singles = W.scenes(120, split="train", seed=1, two=False)
    for s in singles:
        assert W.dominant_colour(s.render()) == s.things[0].colour, s.caption
        assert s.things[0].colour in s.caption and s.things[0].shape in s.caption


def test_positions_sizes_and_pairs_match_the_caption():
    for s in W.scenes(150, split="train", seed=2, two=False):
        ys, xs = np.nonzero(_foreground(s.render(), s))
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2  # box centre: a triangle's mass sits low
        expected = {"center": (32, 32), "left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46)}
        ex, ey = expected[s.position]
        assert abs(cx - ex) < 5 and abs(cy - ey) < 5, (s.caption, cx, cy)
    areas = {
        size: [
            int(_foreground(s.render(), s).sum())
            for s in W.scenes(80, split="train", seed=5, two=False)
            if s.things[0].size == size
        ]
        for size in W.SIZES
    }
    assert max(areas["small"]) < min(areas["large"])  # "small" and "large" never overlap in pixels
    for s in W.scenes(40, split="train", seed=6, two=True):
        img = np.asarray(s.render(), dtype=np.float64)
        first, second = (img[:, :32], img[:, 32:]) if s.relation == "left of" else (img[:32], img[32:])
        assert W.dominant_colour(Image.fromarray(first.astype(np.uint8))) == s.things[0].colour, s.caption
        assert W.dominant_colour(Image.fromarray(second.astype(np.uint8))) == s.things[1].colour, s.caption


def test_shapes_are_distinguishable():
    """The ring has a hole, the cross has empty corners, the square fills its box: a model can tell them apart."""

    def scene(shape):
        return W.Scene((W.Thing(shape, "red", "large"),), "white", position="center", variant=1)

    fill = {}
    for shape in W.SHAPES:
        fg = _foreground(scene(shape).render(), scene(shape))
        ys, xs = np.nonzero(fg)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill[shape] = fg.sum() / box
        centre = fg[int(ys.mean()) - 1 : int(ys.mean()) + 2, int(xs.mean()) - 1 : int(xs.mean()) + 2]
        assert centre.all() == (shape != "ring"), shape
    assert fill["square"] > 0.95 > fill["circle"] > 0.7 > fill["diamond"] > 0.4
    assert fill["triangle"] < 0.6 and fill["cross"] < 0.6


def test_held_out_split_is_disjoint_and_covers_every_attribute():
    train = W.scenes(3000, split="train", seed=0)
    test = W.scenes(300, split="test", seed=0)
    assert all(s.split == "train" for s in train) and all(s.split == "test" for s in test)
    assert not {s.key for s in train} & {s.key for s in test}
    seen = {(attr, getattr(t, attr)) for s in train for t in s.things for attr in ("shape", "colour", "size")}
    every = {("shape", v) for v in W.SHAPES} | {("colour", v) for v in W.COLOURS} | {("size", v) for v in W.SIZES}
    assert seen == every
    # The held-out share of attribute combinations is what HELD_OUT_PERCENT says (within sampling error).
    rng = np.random.default_rng(0)
    drawn = [W.sample_scene(rng) for _ in range(4000)]
    share = np.mean([s.split == "test" for s in drawn])
    assert abs(share - W.HELD_OUT_PERCENT / 100) < 0.03


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError, match="colour must be one of"):
        W.Thing("circle", "teal", "small")
    with pytest.raises(ValueError, match="position"):
        W.Scene((W.Thing("circle", "red", "small"),), "white")
    with pytest.raises(ValueError, match="split must be"):
        W.scenes(1, split="val", seed=0)


def test_dialogues_use_their_images_correctly():
    gallery = W.scenes(20, split="test", seed=9)
    dialogues = W.dialogues(200, split="test", seed=0, gallery=gallery)
    assert {d.kind for d in dialogues} == {"describe", "compare", "show", "draw"}
    for d in dialogues:
        user, answer = d.turns
        if d.kind == "describe":
            (scene,) = user.images
            said, asked = answer.text, user.text
            if asked in ("What is in this image?", "Describe the picture."):
                assert all(t.colour in said and t.shape in said for t in scene.things), (asked, said)
            elif "colour" in asked:
                assert said == f"it is {scene.things[0].colour}."
            elif "shape is" in asked:
                assert said == f"it is a {scene.things[0].shape}."
            else:
                assert asked == "Where is the shape?"
                assert (scene.relation or W.describe(scene, background=False).split()[-1]) in said, said
        elif d.kind == "compare":
            a, b = (s.things[0] for s in user.images)
            same = {
                "bigger": a.size == "large" and b.size == "small",
                "colour": a.colour == b.colour,
                "shape": a.shape == b.shape,
            }  # "bigger" first: its question also says "shape"
            asked = next(k for k in same if k in user.text)
            assert answer.text.startswith("yes" if same[asked] else "no"), (user.text, answer.text, a, b)
        elif d.kind == "show":
            assert answer.output == "retrieve" and answer.target in gallery
            assert answer.target.things[0].colour in user.text
        else:
            assert answer.output == "generate" and user.text.lower().startswith(("draw", "can you draw", "make"))
            assert all(t.colour in user.text and t.shape in user.text for t in answer.target.things)
    # Laid out as the chat engine lays a conversation out: a first turn's images before BOS and "Q:".
    text = dialogues[0].text(image=lambda s: "<img>", output=lambda o: "[RET]", bos="<s>")
    assert text.startswith("<img><s>Q: ") and "\nA: " in text
    compare = next(d for d in dialogues if d.kind == "compare")
    assert compare.text(image=lambda s: "<img>").startswith("<img><img>Q: ")
    show = next(d for d in dialogues if d.kind == "show")
    assert show.text(image=lambda s: "<img>", output=lambda o: "[RET]", bos="<s>").startswith("<s>Q: ")
    assert show.text(image=lambda s: "<img>", output=lambda o: "[RET]").endswith(".[RET]")


def test_decision_prompts_are_labelled_by_what_they_ask():
    prompts = W.decision_prompts(100, split="train", seed=0)
    assert {label for _, label in prompts} == {"retrieve", "generate"}
    for text, label in prompts:
        assert text.startswith("Q: ") and "\nA: here is a " in text  # as the chat engine lays the exchange out
        asks_to_draw = text[3:].lower().startswith(("draw", "can you draw", "make me"))
        assert (label == "generate") == asks_to_draw, text
    # After an earlier exchange (half of them): the label follows the last request, whatever the earlier one was
    later = W.decision_prompts(100, split="train", seed=0, earlier_share=0.5)
    two = [(t, label) for t, label in later if t.count("Q: ") == 2]
    assert 25 < len(two) < 75
    kinds = set()
    for (text, label), (alone, alone_label) in zip(later, prompts, strict=True):
        assert text.endswith(alone) and label == alone_label  # the same last exchange, with or without one before
        if text != alone:
            first, last = text.split("\nQ: ")
            assert first.startswith("Q: ") and "\nA: here is a " in first
            kinds.add(("draw" in first.split("\nA:")[1].split()[3], label))
    assert len(kinds) == 4  # every earlier kind before every later one


def test_exported_captions_describe_their_images(tmp_path):
    scenes = W.scenes(12, split="train", seed=11, two=False)
    tsv = W.export_captions(tmp_path, scenes, seed=0, captions_per_image=2)
    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 24
    for row in rows:
        img = Image.open(tmp_path / row["image"])
        assert img.size == (64, 64)
        assert W.dominant_colour(img) in row["caption"]
    assert "query" not in rows[0]
    W.export_captions(tmp_path / "q", scenes, seed=0, captions_per_image=2, answer_share=0.5)
    with open(tmp_path / "q" / "captions.tsv") as f:
        asked = list(csv.DictReader(f, delimiter="\t"))
    assert [r["caption"] for r in asked] == [r["caption"] for r in rows]  # the captions do not change
    queries = [r["query"] for r in asked if r["query"]]
    assert 0 < len(queries) < len(asked)
    assert all(q.startswith(("here is a photo of ", "here is a drawing of ")) for q in queries)
    for row in asked:
        if row["query"]:
            shape = re.search(r"\b(" + "|".join(W.SHAPES) + r")\b", row["caption"]).group(1)
            colour = W.dominant_colour(Image.open(tmp_path / "q" / row["image"]))
            assert shape in row["query"] and colour in row["query"], row


def test_exported_prompts_ask_about_the_image_and_its_caption_answers(tmp_path):
    """With prompt_share, a share of the images is captioned as the answer to a chat question about it (the prompt
    column, escaped to stay one TSV line); `fromage-gill train` reads it back as the chat's layout."""
    from fromage_gill.training.data import read_records

    scenes = W.scenes(16, split="train", seed=12, two=False)
    plain = W.export_captions(tmp_path / "p", scenes, seed=0)
    tsv = W.export_captions(tmp_path / "q", scenes, seed=0, prompt_share=0.5)
    lines = tsv.read_text().splitlines()
    assert lines[0] == "caption\timage\tprompt" and len(lines) == 17
    recs = read_records(tsv).items
    asked = [r for r in recs if r.prompt]
    assert 0 < len(asked) < len(recs)
    for r, p in zip(recs, read_records(plain).items, strict=True):
        if r.prompt is None:
            assert r.caption == p.caption  # the other captions do not change
            continue
        assert r.prompt in ("Q: What is in this image?\nA:", "Q: Describe the picture.\nA:")
        scene = scenes[int(Path(r.key).stem)]
        assert r.caption == W.describe(scene, background="Describe" in r.prompt) + "."


def test_typed_requests_differ_from_the_written_ones_only_in_first_letter_case_and_closing_mark():
    assert W.typed("Show me a photo of a red square.") == "show me a photo of a red square"
    assert W.typed("Can you draw a blue ring?", unmarked=False) == "can you draw a blue ring?"
    assert W.typed("Draw a red circle.", lower=False) == "Draw a red circle"
    assert W.typed("Show me a red square") == "show me a red square"  # nothing to drop
    assert W.typed("") == ""


def test_lm_corpus_is_laid_out_as_the_chat_engine_lays_out_a_conversation():
    from fromage_gill.toy.pretrain import corpus

    texts = corpus(300, split="train", seed=0, bos="<s>")
    assert all(t.count("<s>") == 1 for t in texts)  # once, before the first text
    multi = [t for t in texts if t.count("Q: ") > 1]
    assert multi and all("\nA: " in t for t in multi)
    # a later turn's images come after the turn separator and before "Q:", as prompt.dialogue_pieces puts them
    later = [t for t in multi if ")Q: " in t.split("\n", 2)[-1]]
    assert later and all(("\n(" in t) for t in later)
    shown_first = [t for t in texts if t.startswith("(") and "Q: " in t]
    assert shown_first and all(t.index("<s>") < t.index("Q: ") and t.index(")") < t.index("<s>") for t in shown_first)
