"""The chat app as a product, in headless Chromium on tiny-gill (toy-gill for the examples): nothing typed is
lost, a reload and a restart restore the conversation, an answer with an image is one message, the progress bar
shows while an image is drawn, and every shipped example answers. Screenshots go to $FROMAGE_GILL_SCREENSHOTS."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from browser_helpers import (  # noqa: E402 (after the skips)
    MARKS,
    bot_messages,
    delete_chat,
    free_port,
    open_page,
    send,
    user_texts,
    wait_idle,
)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("FROMAGE_GILL_SCREENSHOTS") or tempfile.mkdtemp(prefix="fromage_gill_shots_"))
CAT = ROOT / "assets" / "images" / "chelsea.jpg"
pytestmark = MARKS
sys.path.insert(0, str(ROOT))

LM_DELAY_S = {"value": 0.0}  # per LM forward: slows the tiny model so that a message lands mid-answer


def launch(pipeline, cache_dir: Path, **defaults):
    import app

    options = app.AppOptions(indexes=app.load_indexes(None, pipeline) or None, cache_dir=cache_dir, defaults=defaults)
    demo = app.build_demo(pipeline, options)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_style())
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def slowed(tiny_gill):
    model = tiny_gill.model
    forward = model.forward_lm

    def slow(*args, **kwargs):
        time.sleep(LM_DELAY_S["value"])
        return forward(*args, **kwargs)

    model.forward_lm = slow  # instance attribute, removed below
    yield tiny_gill
    del model.forward_lm


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("app_cache")


@pytest.fixture(scope="module")
def server(slowed, cache):
    demo, url = launch(slowed, cache, max_new_tokens=12, num_inference_steps=2, mode="text")
    yield url
    demo.close()


def test_text_typed_during_an_answer_is_sent_after_it(server):
    with open_page(server) as page:
        LM_DELAY_S["value"] = 0.05
        try:
            send(page, "first, a long answer")
            page.locator("#stop").wait_for()  # shown while the answer runs
            assert page.locator("#regenerate").is_disabled() and page.locator("#clear").is_disabled()
            page.locator("#message textarea").fill("second, typed meanwhile")
            page.locator("#message textarea").press("Enter")  # gradio holds a submit while its event runs
        finally:
            LM_DELAY_S["value"] = 0.0
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
        wait_idle(page)
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 2")
        wait_idle(page)
        assert user_texts(page) == ["first, a long answer", "second, typed meanwhile"], "sent after the answer"
        assert page.locator("#message textarea").input_value() == ""
        assert page.locator("#stop").is_hidden() and not page.locator("#regenerate").is_disabled()


def test_a_too_long_message_stays_in_the_box(server):
    with open_page(server) as page:
        long = "word " * 3000
        send(page, long)
        page.locator(".toast-wrap").filter(has_text="fits 512").first.wait_for()
        wait_idle(page)
        assert page.locator("#message textarea").input_value() == long, "the refused message is not lost"
        assert bot_messages(page).count() == 0, "the reason is a notice, not a bot turn"


def test_a_reload_and_a_restart_restore_the_conversation(slowed, server, cache):
    with open_page(server) as page:
        send(page, "remember me")
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
        wait_idle(page)
        answer = bot_messages(page).last.inner_text()
        page.reload()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
        assert user_texts(page) == ["remember me"] and bot_messages(page).last.inner_text() == answer
        page.locator("#sidebar").get_by_text("remember me").first.wait_for(state="attached")
        storage = page.context.storage_state()

    demo, url = launch(slowed, cache, max_new_tokens=12, mode="text")  # a restart: a new process, the same disk
    try:
        # The same browser: its local storage, moved to the new server's origin (another port here).
        origin = url.rstrip("/")
        storage["origins"] = [{**o, "origin": origin} for o in storage["origins"]]
        with open_page(url, storage_state=storage) as page:
            page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
            assert user_texts(page) == ["remember me"] and bot_messages(page).last.inner_text() == answer
            page.screenshot(path=str(SHOTS / "restored.png"))
    finally:
        demo.close()


def test_an_answer_with_an_image_is_one_message_and_drawing_shows_progress(slowed, cache, monkeypatch):
    # Each denoising step takes a noticeable time, as on a real model: the page shows the latest reply when it
    # catches up, so a 4-step drawing of the tiny UNet (milliseconds) could end before any step is shown.
    unet = slowed.image_generator.pipe.unet
    step = unet.forward

    def slow_step(*args, **kwargs):
        time.sleep(0.15)
        return step(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", slow_step)
    demo, url = launch(slowed, cache, mode="generate", image_logit_bias=20.0, max_images=1, max_new_tokens=6)
    try:
        with open_page(url, height=1000) as page:
            page.evaluate("""() => { window.__seen = [];
                new MutationObserver(() => window.__seen.push(document.querySelector('#chatbot').innerText))
                    .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
            }""")
            send(page, "draw a cat", [CAT])
            page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row img').length >= 1")
            wait_idle(page)
            seen = page.evaluate("() => window.__seen")
            assert any("generating an image: step" in s for s in seen), "the step count showed while drawing"
            rows = bot_messages(page)
            assert rows.count() == 1, "text, image and label in one message"
            text = rows.first.inner_text()
            assert "Generated (seed" in text and rows.first.locator("img").count() == 1
            page.screenshot(path=str(SHOTS / "one-message.png"))
    finally:
        demo.close()


def test_every_example_answers_sensibly(toy_gill, tmp_path):
    from fromage_gill.chat.page import example_messages

    demo, url = launch(toy_gill, tmp_path, num_inference_steps=4)
    try:
        with open_page(url, height=1400) as page:
            for k, example in enumerate(example_messages(toy_gill)):
                if k:
                    delete_chat(page)
                page.locator("#examples button, #examples .gallery-item").nth(k).click()
                page.wait_for_function(
                    "t => document.querySelector('#message textarea').value === t", arg=example["text"]
                )
                page.locator("#message textarea").press("Enter")
                page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
                wait_idle(page)
                answer = bot_messages(page).last.inner_text().lower()
                images = bot_messages(page).last.locator("img").count()
                text = example["text"].lower()
                if text.startswith(("show", "draw")):
                    assert images == 1 and ("retrieved" in answer if text.startswith("show") else "generated" in answer)
                else:
                    assert images == 0, f"{example['text']!r} got an image nobody asked for: {answer}"
                    assert answer.strip().endswith("."), f"{example['text']!r} answered {answer!r}"
                    assert any(c in answer for c in ("red", "green", "blue", "yellow", "purple", "orange"))
    finally:
        demo.close()
