"""Stable Diffusion from mapper embeddings: negative embeddings once, seeds, guidance, safety checker, interrupt."""

from __future__ import annotations

import time

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
    gen = ImageGenerator(tiny_gill.diffusion)
    out = gen(embeds, num_inference_steps=5, seed=0, interrupt=lambda: len(steps) >= 1)
    assert out.interrupted and out.images == [] and len(steps) == 1
    steps.clear()  # a call interrupted before it starts never runs
    out = gen(embeds, num_inference_steps=5, seed=0, interrupt=lambda: True)
    assert out.interrupted and out.images == [] and steps == []


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


def _batched(gen, calls, after=None):
    """Run ``calls`` (kwargs for ``gen``) from threads that all queue while the generator is busy, so they run as
    batches; their outcomes (or errors) in call order. ``after(i)`` runs in call i's thread as soon as it returns."""
    import threading
    import time

    outcomes: list = [None] * len(calls)

    def one(i, kw):
        try:
            outcomes[i] = gen(**kw)
        except Exception as e:  # noqa: BLE001 -- compared by the test
            outcomes[i] = e
        if after is not None:
            after(i)

    threads = [threading.Thread(target=one, args=(i, kw)) for i, kw in enumerate(calls)]
    with gen._lock:  # the generator is busy: every call waits in the queue
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(gen._pending) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(gen._pending) == len(calls)
    for t in threads:
        t.join(60)
    return outcomes


def test_concurrent_calls_run_as_one_batch_each_with_its_solo_image(tiny_gill):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    hidden = torch.randn(3, 8, tiny_gill.model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = tiny_gill.model.map_to_diffusion(hidden)
    calls = [
        dict(prompt_embeds=embeds[:1], num_inference_steps=3, guidance_scale=4.0, seed=11),
        dict(prompt_embeds=embeds[1:], num_inference_steps=3, guidance_scale=4.0, seed=12),  # two images
    ]
    solo = [gen(**kw) for kw in calls]
    assert gen.batches == [1, 2]
    batched = _batched(gen, calls)
    assert gen.batches[-1] == 3  # one UNet batch for both calls
    for alone, together in zip(solo, batched, strict=True):
        assert len(together.images) == len(alone.images) and not together.interrupted
        for a, b in zip(alone.images, together.images, strict=True):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert diff.max() <= 1  # the same seeded noise and conditioning: equal up to float rounding
    # the two calls' images differ (their own noise and conditioning, not a copy of the batch's first)
    assert not np.array_equal(np.asarray(batched[0].images[0]), np.asarray(batched[1].images[0]))


def test_only_calls_diffusers_runs_alike_batch_and_max_batch_bounds_a_batch(tiny_gill, embeds):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False, max_batch=2)
    calls = [
        dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=4.0, seed=0),
        dict(prompt_embeds=embeds, num_inference_steps=3, guidance_scale=4.0, seed=0),  # other step count
        dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, seed=0),  # other guidance
        dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=4.0, seed=1),
        dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=4.0, seed=2),  # past max_batch
    ]
    out = _batched(gen, calls)
    assert all(len(o.images) == 1 for o in out)
    assert sorted(gen.batches) == [1, 1, 1, 2]
    with pytest.raises(ValueError, match="max_batch"):
        ImageGenerator(tiny_gill.diffusion, max_batch=0)


def test_a_stopped_call_returns_at_its_step_and_leaves_its_batch_mates_running(tiny_gill, embeds):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    steps: list[int] = []
    seen_at_return: list[int] = []
    kw = dict(prompt_embeds=embeds, num_inference_steps=6, guidance_scale=4.0)
    calls = [
        dict(kw, seed=0, interrupt=lambda: len(steps) >= 1),  # stops after the batch's first step
        dict(kw, seed=1, on_step=lambda s, _: steps.append(s) or time.sleep(0.05)),  # a step takes 50 ms
    ]
    stopped, finished = _batched(gen, calls, after=lambda i: seen_at_return.append(len(steps)) if i == 0 else None)
    assert gen.batches[-1] == 2  # they ran together
    assert stopped.interrupted and stopped.images == []
    assert seen_at_return[0] < 6  # the stopped call returned while its batch mate was still denoising
    assert not finished.interrupted and len(finished.images) == 1 and steps == [1, 2, 3, 4, 5, 6]
    alone = gen(embeds, num_inference_steps=6, guidance_scale=4.0, seed=1)
    diff = np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(finished.images[0], dtype=int))
    assert diff.max() <= 1


def test_a_failed_batch_is_retried_call_by_call_so_an_error_is_its_own(tiny_gill, embeds, monkeypatch):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    pipe_cls = tiny_gill.diffusion.__class__
    orig = pipe_cls.__call__

    def fragile(self, **kw):  # fails at batch 2 (as out of memory would), and for seed 5's call alone
        if kw["prompt_embeds"].shape[0] > 1 or kw["generator"].initial_seed() == 5:
            raise RuntimeError("out of memory")
        return orig(self, **kw)

    monkeypatch.setattr(pipe_cls, "__call__", fragile)
    ok, bad = _batched(
        gen,
        [
            dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=4.0, seed=4),
            dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=4.0, seed=5),
        ],
    )
    assert len(ok.images) == 1
    assert isinstance(bad, RuntimeError) and "out of memory" in str(bad)


def test_a_call_stopped_while_waiting_returns_at_once_and_never_runs(tiny_gill, embeds):
    import threading

    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    stop = threading.Event()
    out: list = []
    kw = dict(num_inference_steps=2, seed=0, interrupt=stop.is_set)
    call = threading.Thread(target=lambda: out.append(gen(embeds, **kw)))
    with gen._lock:  # another batch is running
        call.start()
        deadline = time.monotonic() + 10
        while not gen._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        call.join(5)  # returns while the generator is still busy
        assert not call.is_alive() and out[0].interrupted and out[0].images == []
        assert gen._pending == []


def test_an_idle_generator_lets_its_runner_go_and_can_itself_be_collected(tiny_gill, embeds):
    import gc
    import threading
    import weakref

    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False, idle_s=0.2)

    name = f"diffusion-batches-{id(gen):x}"

    def runners():
        return [t for t in threading.enumerate() if t.name == name]

    for _ in range(2):  # the second call starts a runner again
        assert len(gen(embeds, num_inference_steps=1, seed=0).images) == 1
        for t in runners():
            t.join(10)  # it ends 0.2 s after its last batch
        assert runners() == [] and gen._runner is None
    ref = weakref.ref(gen)
    del gen
    gc.collect()
    assert ref() is None  # nothing keeps an unused generator (and its pipeline) alive
    with pytest.raises(ValueError, match="idle_s"):
        ImageGenerator(tiny_gill.diffusion, idle_s=0)
