"""Progress while an image is generated: ImageGenerator's step callback (``on_step`` and a thread's ``reporting``
listener) and the app's live answer, which shows the step count while the image is being made."""

from __future__ import annotations

import threading

import torch

from fromage_gill.chat.handlers import ChatHandlers
from fromage_gill.chat.options import AppOptions
from fromage_gill.generate.diffusion import ImageGenerator

DRAW = dict(mode="generate", image_logit_bias=20.0, max_images=1, max_new_tokens=6, seed="1")


def embeds(pipe) -> torch.Tensor:
    dim = pipe.text_encoder.config.hidden_size
    return torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(0))


def test_each_denoising_step_is_reported(tiny_gill):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    steps: list[tuple[int, int]] = []
    out = gen(embeds(tiny_gill.diffusion), num_inference_steps=3, seed=0, on_step=lambda k, n: steps.append((k, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and len(out.images) == 1

    heard: list[tuple[str, int]] = []
    with gen.reporting(lambda k, n: heard.append((threading.current_thread().name, k))):
        other = threading.Thread(target=gen, args=(embeds(tiny_gill.diffusion),), kwargs=dict(num_inference_steps=2))
        other.start()
        other.join()  # another thread's generation is not this thread's to report
        gen(embeds(tiny_gill.diffusion), num_inference_steps=2, seed=0)
    gen(embeds(tiny_gill.diffusion), num_inference_steps=2, seed=0)  # the block is over: nobody listens
    assert heard == [(threading.current_thread().name, 1), (threading.current_thread().name, 2)]


def test_the_live_answer_shows_the_step_count_while_drawing(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    replies = list(h.send(None, {"text": "draw a cat", "files": []}, num_inference_steps=3, **DRAW))
    shown = [r.messages[-1]["content"] for r in replies]
    for k in (1, 2, 3):
        assert any(f"generating an image: step {k}/3" in text for text in shown), shown
    assert "`" + "█" * 10 + "`" in next(t for t in shown if "step 3/3" in t)  # the bar is full at the last step
    final = shown[-1]
    assert "**Generated** (seed 1)" in final and "step" not in final, "the bar gives way to the image"
