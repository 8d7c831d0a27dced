"""Progress while an image is generated: ImageGenerator's step callback and its ``steps`` iterator, the engine's
``ImageProgress`` events, and the app's live answer, which shows the step count while the image is being made
(all without gradio)."""

from __future__ import annotations

import torch
from PIL import Image

from fromage_gill.chat.handlers import ChatHandlers
from fromage_gill.chat.options import AppOptions
from fromage_gill.chat.running import turn_updates
from fromage_gill.chat.session import ChatSession
from fromage_gill.generate import Chat, GenerationSettings, ImageResult, TurnEnd
from fromage_gill.generate.diffusion import GeneratedImages, ImageGenerator
from fromage_gill.generate.events import ImagePending, ImageProgress

DRAW = dict(mode="generate", image_logit_bias=20.0, max_images=1, max_new_tokens=6, seed="1")


def embeds(pipe) -> torch.Tensor:
    dim = pipe.text_encoder.config.hidden_size
    return torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(0))


def test_each_denoising_step_is_reported(tiny_gill):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    steps: list[tuple[int, int]] = []
    out = gen(embeds(tiny_gill.diffusion), num_inference_steps=3, seed=0, on_step=lambda k, n: steps.append((k, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and len(out.images) == 1

    streamed = list(gen.steps(embeds(tiny_gill.diffusion), num_inference_steps=3, seed=0))
    assert streamed[:3] == [1, 2, 3] and len(streamed) == 4
    last = streamed[-1]
    assert isinstance(last, GeneratedImages) and last.images[0].tobytes() == out.images[0].tobytes(), (
        "the streamed generation makes the same image as the direct call"
    )


def test_closing_the_steps_early_interrupts_the_generation(tiny_gill):
    gen = ImageGenerator(tiny_gill.diffusion, safety_checker=False)
    steps = gen.steps(embeds(tiny_gill.diffusion), num_inference_steps=50, seed=0)
    assert next(steps) == 1
    steps.close()  # interrupts the call and waits for it to end
    assert gen._lock.acquire(timeout=10) and gen._lock.release() is None, "the generator is free again"
    assert len(gen(embeds(tiny_gill.diffusion), num_inference_steps=2, seed=0).images) == 1  # and serves the next


def test_the_engine_streams_progress_as_events_of_the_turn(tiny_gill):
    chat = Chat(tiny_gill)
    settings = GenerationSettings(
        mode="generate", image_logit_bias=20.0, max_images=1, max_new_tokens=6, seed=1, num_inference_steps=3
    )
    events = list(chat.send(["draw a cat"], settings))
    kinds = [type(e).__name__ for e in events]
    first = kinds.index("ImagePending")
    assert kinds[first : first + 5] == ["ImagePending", *["ImageProgress"] * 3, "ImageResult"], kinds
    assert [e for e in events if isinstance(e, ImageProgress)] == [ImageProgress(0, k, 3) for k in (1, 2, 3)]
    assert isinstance(events[-1], TurnEnd)


def test_progress_events_reach_the_session_without_gradio(tiny_gill, tmp_path):
    session = ChatSession(Chat(tiny_gill), image_dir=tmp_path)
    session.start_streaming(["draw a cat"])
    picture = Image.new("RGB", (8, 8), (200, 10, 10))

    def engine():
        yield ImagePending(0)
        for k in (1, 2):
            yield ImageProgress(0, k, 2)
        yield ImageResult(image=picture, source="generated", seed=5)
        yield TurnEnd("image", 5)

    shown = [session.progress for _ in turn_updates(session, engine(), save=lambda: None)]
    assert shown == [None, (1, 2), (2, 2), None, None], "every event is shown; the image replaces the progress"
    session.progress = (1, 2)
    assert session.progress_text() == "*(generating an image: step 1/2)* `█████░░░░░`"
    assert isinstance(session.live[-1], ImageResult) and session.live[-1].image is picture


def test_the_live_answer_shows_the_step_count_while_drawing(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    replies = list(h.send(None, {"text": "draw a cat", "files": []}, num_inference_steps=3, **DRAW))
    shown = [r.messages[-1]["content"] for r in replies]
    for k in (1, 2, 3):
        assert any(f"generating an image: step {k}/3" in text for text in shown), shown
    assert "`" + "█" * 10 + "`" in next(t for t in shown if "step 3/3" in t)  # the bar is full at the last step
    final = shown[-1]
    assert "**Generated** (seed 1)" in final and "step" not in final, "the bar gives way to the image"
