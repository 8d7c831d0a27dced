"""The shipped toy-world checkpoints (``checkpoints/``) keep what docs/toy.md reports.

The measures of ``fromage-gill toy eval`` (``fromage_gill/toy/evaluate.py``) on a smaller fixed held-out set, each
with a floor a little under the figure measured on that set (in the comments): greedy decoding and seeded diffusion
make the figures exact on one machine, and the margin absorbs another CPU's rounding. A regression anywhere in the
stack (backbones, loaders, prompt layout, decoding loop, index, decision head, diffusion) fails here. Where a
target of the toy-world issue is not met, the floor guards the figure reached, and docs/toy.md says what limits it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fromage_gill.paths import checkout_path
from fromage_gill.toy import evaluate as E
from fromage_gill.toy.pretrain import Recipe
from fromage_gill.toy.world import gallery_scenes

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
SHIPPED = [
    "toy/lm",
    "toy/clip",
    "toy/diffusion",
    "toy-fromage",
    "toy-gill",
    "indexes/toy-gallery",
    "indexes/toy-fromage",
    "indexes/toy-gill",
]
N = 20


def test_the_shipped_checkpoints_are_the_recipes_and_fit_the_budget():
    report = json.loads((CHECKPOINTS / "toy" / "build_report.json").read_text())
    assert report["recipe"] == json.loads(json.dumps(asdict(Recipe())))  # rebuilt after every recipe change
    assert set(report["stages"]) >= {"tokenizer", "clip", "lm", "vae", "unet", "data", "fromage", "gill"}
    size = sum(f.stat().st_size for d in SHIPPED for f in (CHECKPOINTS / d).rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"the shipped toy world is {size / 2**20:.1f} MB (budget 30 MB)"


# measured on these 20: toy-gill colour 1.0, both 0.7; toy-fromage colour 1.0, both 0.4 (its one visual token
# carries the colour, less often the shape)
@pytest.mark.parametrize(("model", "floor"), [("toy_gill", 0.6), ("toy_fromage", 0.3)])
def test_captions_name_colour_and_shape(model, floor, request):
    (colour, shape, both), samples = E.captioning(request.getfixturevalue(model), N)
    assert colour >= 0.9 and both >= floor, samples


# measured: toy-gill R@1 0.36, R@10 0.847; toy-fromage 0.403, 0.867 (chance R@1 0.0033)
@pytest.mark.parametrize(("model", "r1", "r10"), [("toy_gill", 0.3, 0.8), ("toy_fromage", 0.33, 0.82)])
def test_caption_to_image_retrieval_over_the_gallery(model, r1, r10, request):
    res = E.retrieval(request.getfixturevalue(model), gallery_scenes(300))
    assert res["R@1"] >= r1 and res["R@10"] >= r10, res


def test_decision_routes_show_to_retrieval_and_draw_to_generation(toy_gill):
    assert E.decision(toy_gill, 2 * N) >= 0.9  # measured 1.0 (the target)


def test_chat_answers_show_and_draw_requests_with_the_right_kind_of_image(toy_gill):
    # measured: show 1.0 / draw 0.9 answered with an image of the right kind, which has the colour and shape asked
    # for 0.6 / 0.3 (by the gallery's record / the dominant colour and the CLIP judge); descriptions answered
    # without a picture 1.0, naming colour and shape 0.6, then the colour asked about that image 1.0 (0.1 if the
    # prompt kept no earlier exchange); the 2nd and 3rd requests of a conversation with an image of the right kind
    # and colour 0.333 (2 of 6; 0.0 with the answers' image tokens replayed in the prompt; over 80 such requests
    # 0.55, docs/toy.md)
    res, samples = E.requests(toy_gill, N, steps=10, guidance=4.0, clip_dir=None)
    assert res["show_image"] >= 0.9 and res["draw_image"] >= 0.8, samples
    assert res["show_routed"] >= 0.9 and res["draw_routed"] >= 0.8, samples
    assert res["show_match"] >= 0.5 and res["draw_match"] >= 0.2, (res, samples)
    assert res["describe_no_image"] >= 0.8 and res["describe_right"] >= 0.5, (res, samples)
    assert res["follow_up_colour"] >= 0.8 and res["later_right"] >= 0.3, res
    # typed "show me a red square" style (lower case, no closing mark): measured 0.7, against 0.9 as written
    assert res["typed_right"] >= 0.5 and res["plain_right"] >= 0.8, res


def test_the_shape_judge_picks_the_shape_of_real_held_out_images():
    # The generation figures' judge, checked where the answer is known: measured 0.867 (0.86 over 600)
    scenes = E.held_out_singles(60)
    picks = E.shape_judge(checkout_path("repo:checkpoints/toy/clip"), [s.render() for s in scenes], scenes)
    assert np.mean([p == s.things[0].shape for p, s in zip(picks, scenes, strict=True)]) >= 0.8


def test_generated_images_have_the_requested_colour_and_shape(toy_gill):
    # measured: colour 0.917 (GILL) and 0.833 (the diffusion stack alone), CLIP shape 0.583 and 0.5
    res = E.generation(toy_gill, 12, steps=10, guidance=4.0, clip_dir=None)
    assert res["gill_colour"] >= 0.8 and res["diffusion_alone_colour"] >= 0.7, res
    assert res["gill_shape"] >= 0.4 and res["diffusion_alone_shape"] >= 0.4, res


@pytest.mark.parametrize("model", ["toy_gill", "toy_fromage"])
def test_a_question_about_a_shown_image(model, request):
    colour, samples = E.colour_question(request.getfixturevalue(model), N)
    assert colour >= 0.8, samples  # measured 0.95 (toy-gill), 0.95 (toy-fromage)


def test_two_shown_images(toy_gill):
    # Two shown images: the frozen LM answers from the images' descriptions; from the visual tokens it does not yet
    # (docs/toy.md): the floor guards the LM's part.
    assert E.comparison_from_descriptions(toy_gill, N) >= 0.55  # measured 0.65
