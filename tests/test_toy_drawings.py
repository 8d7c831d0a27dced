"""The held-out drawings set (``fromage_gill/toy/drawings.py``, checked in as ``assets/drawings/``): made as its
generator makes it, varied, its colours within their names, and ``fromage-gill toy eval``'s measures on it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fromage_gill.cli import build_parser
from fromage_gill.paths import checkout_path
from fromage_gill.toy import conversations as C
from fromage_gill.toy import drawings as D
from fromage_gill.toy import evaluate as E
from fromage_gill.toy.world import COLOURS, SHAPES

CHECKED_IN = Path(checkout_path(D.DRAWINGS_DIR))
PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float64)


def nearest_colour(rgb) -> str:
    return list(COLOURS)[int(((PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1).argmin())]


@pytest.fixture(scope="module")
def generated():
    return D.generate()


def test_the_checked_in_set_is_what_the_generator_makes(generated, tmp_path):
    # Labels (every drawing's parameters) exactly; pixels up to rounding: another Pillow or libjpeg may round an
    # anti-aliased edge or a JPEG block differently (on the machine that wrote the set they are equal), while a
    # changed drawing moves far more than that.
    assert D.load() == [ex for ex, _ in generated]
    D.write(tmp_path)
    assert (tmp_path / D.LABELS).read_text() == (CHECKED_IN / D.LABELS).read_text()
    assert sorted(p.name for p in CHECKED_IN.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    for ex in D.load():
        ours = np.asarray(D.open_image(tmp_path, ex), dtype=np.float64)
        shipped = np.asarray(D.open_image(CHECKED_IN, ex), dtype=np.float64)
        assert ours.shape == shipped.shape, ex.file
        assert np.abs(ours - shipped).mean() < 1.0, f"{ex.file} differs: run `fromage-gill toy drawings`"


def test_labels_parse_and_cover_every_colour_and_shape_twice():
    examples = D.load()
    drawings = [ex for ex in examples if ex.kind == "drawing"]
    assert Counter((ex.colour, ex.shape) for ex in drawings) == {(c, s): 2 for c in COLOURS for s in SHAPES}
    outside = [ex for ex in examples if ex.kind == "out_of_world"]
    assert len(outside) >= 60 and all(ex.colour is None and ex.shape is None for ex in outside)  # figures over 60+
    assert {ex.params["content"] for ex in outside} >= {"noise", "text", "stripes", "checkerboard", "photo"}
    for line in (CHECKED_IN / D.LABELS).read_text().splitlines():
        assert set(json.loads(line)) == {"file", "kind", "colour", "shape", "params"}
    size = sum(p.stat().st_size for p in CHECKED_IN.iterdir())
    assert size < 1.5 * 2**20, f"the drawings set is {size / 2**20:.2f} MB (budget 1.5 MB)"


def test_the_drawings_vary_as_people_draw():
    drawings = [ex for ex in D.load() if ex.kind == "drawing"]
    params = [ex.params for ex in drawings]
    sizes = [(p["width"], p["height"]) for p in params]
    aspects = [w / h for w, h in sizes]
    assert len(set(sizes)) > 60 and max(max(s) for s in sizes) > 300 and min(max(s) for s in sizes) < 64
    assert min(aspects) < 0.75 and max(aspects) > 1.4
    assert {p["style"] for p in params} == {"filled", "outlined", "filled_outlined"}
    assert {p["background"] for p in params} == {"off_white", "grey", "dark", "paper", "gradient"}
    assert 10 < sum(p["jpeg_quality"] is not None for p in params) < 60
    assert 10 < sum(p["wobble"] > 0 for p in params) < 60
    turned = [ex.params["rotation"] for ex in drawings if ex.shape in ("square", "triangle")]
    assert max(turned) - min(turned) > 20


def test_the_same_seed_draws_the_same_pixels_and_another_seed_others():
    def pixels(seed):
        img, params = D.draw("green", "cross", np.random.default_rng(seed))
        return np.asarray(img), params

    (a, pa), (b, pb), (c, pc) = pixels(3), pixels(3), pixels(4)
    assert np.array_equal(a, b) and pa == pb
    assert pa != pc and not np.array_equal(a, c)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_a_drawn_colour_stays_nearer_its_own_name_than_any_other(colour):
    rng = np.random.default_rng([7, len(colour)])
    assert {nearest_colour(D.sample_colour(colour, rng)) for _ in range(2000)} == {colour}


def test_the_fill_of_each_checked_in_drawing_is_its_colour():
    # Mean of a 3x3 patch at the shape's centre, inside every filled shape but the ring (whose centre is a hole):
    # its colour survives anti-aliasing, JPEG and the background.
    checked = 0
    for ex in D.load():
        p = ex.params
        if ex.kind != "drawing" or p["style"] == "outlined" or ex.shape == "ring":
            continue
        img = np.asarray(D.open_image(CHECKED_IN, ex), dtype=np.float64)
        x, y = (round(v) for v in p["centre"])
        assert nearest_colour(img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)) == ex.colour, ex.file
        checked += 1
    assert checked > 30


# ------------------------------------------------------------------------------------------------ the scoring


def test_an_answer_about_a_drawing_is_scored_by_its_first_colour_and_shape_words():
    assert E.describes_drawing("a red circle.", "red", "circle") == (True, True)
    assert E.describes_drawing("A large Red circle at the top.", "red", "circle") == (True, True)
    assert E.describes_drawing("a blue circle", "red", "circle") == (False, False)
    assert E.describes_drawing("a red square above a red circle", "red", "circle") == (True, False)
    assert E.describes_drawing("two red circles", "red", "circle") == (True, True)
    assert E.describes_drawing("something", "red", "circle") == (False, False)


def test_an_out_of_world_image_is_answered_as_such_when_no_shape_is_made_up():
    assert E.answers_out_of_world("a large red circle on the left.") is False
    assert E.answers_out_of_world("a red big ring") is False
    assert E.answers_out_of_world("red and blue squares") is False
    assert E.answers_out_of_world("it is red.") is True
    assert E.answers_out_of_world("a photo of a cat.") is True
    assert E.answers_out_of_world("It does not look like a red circle or any shape.") is True
    assert E.answers_out_of_world("") is True


# ------------------------------------------------------------------------------------------------ the measure


def test_the_describe_measures_on_toy_gill_count_every_image(toy_gill, tmp_path):
    # A part of the set (8 drawings, 4 out-of-world images) through the chat, as `fromage-gill toy eval` runs it
    examples = D.load()
    part = [ex for ex in examples if ex.kind == "drawing"][:8] + [ex for ex in examples if ex.kind != "drawing"][:4]
    for ex in part:
        shutil.copy(CHECKED_IN / ex.file, tmp_path / ex.file)
    lines = [
        line
        for line in (CHECKED_IN / D.LABELS).read_text().splitlines()
        if json.loads(line)["file"] in {ex.file for ex in part}
    ]
    (tmp_path / D.LABELS).write_text("\n".join(lines) + "\n")
    res, samples = E.describe_drawings(toy_gill, tmp_path, steps=4, guidance=4.0)
    assert (res["n"], res["out_of_world_n"], res["no_image_n"]) == (8, 4, 12)
    assert all(0.0 <= res[k] <= 1.0 for k in ("colour", "both", "out_of_world", "no_image")), res
    assert res["colour"] >= 0.75, samples  # measured 1.0 on these 8 (0.958 over all 72)
    assert len(samples) == 10 and samples[0].startswith(part[0].file)


def test_repeated_words_and_answers_worded_as_the_user_are_found():
    assert C.repeats_a_word("the the the yellow circle")
    assert C.repeats_a_word("a red red, red ring")
    assert not C.repeats_a_word("the red circle is the one on the left of the ring")
    assert not C.repeats_a_word("a large large ring")
    for user_like in ("Can you draw a green ring?", "Draw a new picture of a red cross.", "Q: what is it", "show me x"):
        assert C.speaks_as_user(user_like), user_like
    for answer in ("here is a drawing of a red cross.", "it is red.", "a small blue ring on the left.", ""):
        assert not C.speaks_as_user(answer), answer


def test_long_conversations_compare_the_first_and_last_turn_of_each_kind(toy_gill):
    # 4 conversations of 3 turns: each kind asked at a first and a last turn once, one of each in the middle
    res, samples = C.long_conversations(toy_gill, conversations=4, turns=3, steps=2, guidance=4.0)
    assert (res["conversations"], res["turns"], res["answers"]) == (4, 3, 12)
    for key in ("describe_both", "describe_no_image", "out_of_world", "show_match", "draw_colour", "draw_shape"):
        assert 0.0 <= res[f"{key}_first"] <= 1.0 and 0.0 <= res[f"{key}_last"] <= 1.0, key
        assert res[f"{key}_n"] == 1, key
    assert res["routed_n"] == 2  # show and draw
    assert 0.0 <= res["repeats"] <= 1.0 and 0.0 <= res["as_user"] <= 1.0
    assert len(samples) == 4 and samples[0].startswith("conversation 0 turn 1: What is in this image? -> ")
    assert "turn 3:" in samples[1]


def test_toy_eval_describes_the_checked_in_set_by_default():
    args = build_parser().parse_args(["toy", "eval"])
    assert checkout_path(args.drawings) == str(CHECKED_IN)
    assert build_parser().parse_args(["toy", "eval", "--drawings", ""]).drawings == ""
    assert (args.conversations, args.turns) == (60, 20)  # the long conversations run by default, for toy-gill


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "Expecting value"),
        ("[1, 2]", "expected an object, got list"),
        ('{"file": "a.png"}', "kind"),
        ('{"file": "x.png", "kind": "drawing", "colour": "red", "shape": "circle"}', "its image 'x.png' is missing"),
    ],
)
def test_a_damaged_label_file_is_named_with_its_line_before_any_model_loads(
    tmp_path, monkeypatch, capsys, line, problem
):
    from fromage_gill import pipeline
    from fromage_gill.cli import main

    shutil.copy(CHECKED_IN / "d000_red_circle.png", tmp_path / "d000_red_circle.png")
    good = '{"file": "d000_red_circle.png", "kind": "drawing", "colour": "red", "shape": "circle"}'
    (tmp_path / D.LABELS).write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=f"{D.LABELS}:3: not a drawings-set label") as err:
        D.load(tmp_path)
    assert problem in str(err.value) and "fromage-gill toy drawings --out DIR" in str(err.value)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the drawings set was checked")

    monkeypatch.setattr(pipeline, "load_pipeline", no_model)
    assert main(["toy", "eval", "--model", "toy-gill", "--drawings", str(tmp_path)]) == 2
    assert f"{D.LABELS}:3" in capsys.readouterr().err
