"""Stable Diffusion from mapper embeddings: negative embeddings once, seeds, guidance, safety checker, interrupt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fromage_gill.generate.diffusion import ImageGenerator, image_generator


@pytest.fixture
def embeds(tiny_gill):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, tiny_gill.model.hidden_size, generator=g)
    with torch.no_grad():
        return tiny_gill.model.map_to_diffusion(hidden)  # (1, 77, 32)


def test_negative_embeddings_are_the_empty_prompt_computed_once(tiny_gill, monkeypatch):
    pipe = tiny_gill.diffusion
    gen = ImageGenerator(pipe)
    neg = gen.negative_prompt_embeds()
    calls = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(a) or (None, None))
    assert gen.negative_prompt_embeds() is neg and calls == []  # cached per generator
    monkeypatch.undo()
    ref, _ = pipe.encode_prompt("", pipe.text_encoder.device, 1, False)
    torch.testing.assert_close(neg, ref)


def test_seeded_generation_is_reproducible_and_uses_the_negative_embeddings(tiny_gill, embeds, monkeypatch):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    a = gen(embeds, num_inference_steps=2, seed=1)
    b = gen(embeds, num_inference_steps=2, seed=1)
    c = gen(embeds, num_inference_steps=2, seed=2)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    seen = {}
    orig = tiny_gill.diffusion.__class__.__call__

    def spy(self, **kw):
        seen.update(kw)
        return orig(self, **kw)

    monkeypatch.setattr(tiny_gill.diffusion.__class__, "__call__", spy)
    gen(embeds, num_inference_steps=1, guidance_scale=7.5, seed=0)
    torch.testing.assert_close(seen["negative_prompt_embeds"], gen.negative_prompt_embeds())
    assert seen["guidance_scale"] == 7.5 and seen["num_inference_steps"] == 1
    torch.testing.assert_close(seen["prompt_embeds"], embeds)
    gen(embeds, num_inference_steps=1, guidance_scale=1.0, seed=0)
    assert seen["negative_prompt_embeds"] is None  # no guidance, no unconditional branch


def test_guidance_changes_the_image(tiny_gill, embeds):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    plain = gen(embeds, num_inference_steps=2, guidance_scale=1.0, seed=0).images[0]
    guided = gen(embeds, num_inference_steps=2, guidance_scale=7.5, seed=0).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))


def test_safety_checker_is_configurable(tiny_gill, embeds, monkeypatch):
    pipe = tiny_gill.diffusion
    calls = []

    def checker(image, device, dtype):
        calls.append(image.shape[0])
        return torch.zeros_like(image) - 1, [True] * image.shape[0]

    monkeypatch.setattr(pipe, "safety_checker", object(), raising=False)
    monkeypatch.setattr(pipe, "run_safety_checker", checker)
    checked = ImageGenerator(pipe, safety_checker=True)(embeds, num_inference_steps=1, seed=0)
    assert calls == [1] and checked.nsfw == [True]
    unchecked = ImageGenerator(pipe, safety_checker=False)(embeds, num_inference_steps=1, seed=0)
    assert calls == [1] and unchecked.nsfw == [False]


def test_interrupt_stops_between_steps(tiny_gill, embeds, monkeypatch):
    steps = []
    orig = tiny_gill.diffusion.unet.forward
    monkeypatch.setattr(tiny_gill.diffusion.unet, "forward", lambda *a, **k: steps.append(1) or orig(*a, **k))
    out = ImageGenerator(tiny_gill.diffusion)(embeds, num_inference_steps=5, seed=0, interrupt=lambda: True)
    assert out.interrupted and out.images == [] and len(steps) == 1


def test_image_generator_errors(tiny_fromage, tiny_gill, embeds):
    import dataclasses

    with pytest.raises(ValueError, match="retrieves images but cannot generate"):
        image_generator(tiny_fromage)
    with pytest.raises(ValueError, match="load_diffusion_pipeline=False"):
        image_generator(dataclasses.replace(tiny_gill, diffusion=None, image_generator=None))
    assert image_generator(tiny_gill) is image_generator(tiny_gill)
    gen = image_generator(tiny_gill)
    with pytest.raises(ValueError, match="num_inference_steps"):
        gen(embeds, num_inference_steps=0)
