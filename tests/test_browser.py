"""The chat app in a real browser: Playwright drives Debian's Chromium against the app on 127.0.0.1 with tiny-gill,
as a person would use it. Elements are found by their ``elem_id``. Screenshots go to a temporary folder, or to
$FROMAGE_GILL_SCREENSHOTS (``FROMAGE_GILL_SCREENSHOTS=docs/screenshots pytest tests/test_browser.py`` refreshes
the README's).

The tests share one page and run in file order (one conversation that grows, then is exported, cleared and loaded
back); each test still asserts only its own step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from browser_helpers import (  # noqa: E402 (after the skips)
    MARKS,
    answers_text,
    bot_messages,
    chat_text,
    delete_chat,
    free_port,
    open_page,
    send,
    user_messages,
    user_texts,
    wait_idle,
)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("FROMAGE_GILL_SCREENSHOTS") or tempfile.mkdtemp(prefix="fromage_gill_shots_"))
CAT, ROCKET = ROOT / "assets" / "images" / "chelsea.jpg", ROOT / "assets" / "images" / "rocket.jpg"

pytestmark = MARKS

sys.path.insert(0, str(ROOT))


LM_DELAY_S = {"value": 0.0}  # per LM forward; the Stop test slows the tiny model so Stop surely lands mid-answer


@pytest.fixture(scope="module")
def server(tiny_gill):
    import time

    import app

    model = tiny_gill.model
    forward = model.forward_lm

    def slowed(*args, **kwargs):
        time.sleep(LM_DELAY_S["value"])
        return forward(*args, **kwargs)

    model.forward_lm = slowed  # instance attribute, removed below: the shared pipeline is otherwise untouched

    indexes = app.load_indexes(None, tiny_gill)
    options = app.AppOptions(
        indexes=indexes, defaults=dict(max_new_tokens=12, num_inference_steps=2, image_logit_bias=20.0, mode="retrieve")
    )
    demo = app.build_demo(tiny_gill, options)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_style())
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    del model.forward_lm


@pytest.fixture(scope="module")
def page(server):
    with open_page(server, accept_downloads=True) as pg:
        yield pg


# -- helpers -----------------------------------------------------------------------------------------------------


def record_chat_changes(page):
    page.evaluate("""() => {
        window.__chat = [];
        const root = document.querySelector('#chatbot');
        const rec = () => { const rows = root.querySelectorAll('.message-row.bot-row');
                            if (rows.length) window.__chat.push(rows[rows.length - 1].innerText); };
        window.__obs && window.__obs.disconnect();
        window.__obs = new MutationObserver(rec);
        window.__obs.observe(root, {subtree: true, childList: true, characterData: true});
    }""")


def set_slider(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")  # the slider takes the typed value on blur
    page.wait_for_function(
        "([id, v]) => document.querySelector(`#${id} input[type=range]`).value == v", arg=[elem_id, str(value)]
    )


def choose(page, elem_id: str, label: str):
    page.locator(f"#{elem_id} label").filter(has_text=label).first.click()


def download(page, button: str, into: Path) -> Path:
    if not page.locator(f"#{button}").is_visible():
        page.locator("#export").get_by_text("Export / load").first.click()
    page.locator(f"#{button}").click()
    name = "conversation.html" if "html" in button else "conversation.json"
    href = page.wait_for_function(
        "n => { const a = [...document.querySelectorAll('#export_file a')].find(a => a.href.includes(n));"
        " return a && a.href; }",
        arg=name,
    ).json_value()
    resp = page.request.get(href)
    assert resp.ok, href
    path = into / name
    path.write_bytes(resp.body())
    return path


# -- the tests, in the order a person would go -----------------------------------------------------------------


def test_empty_page(page):
    assert page.locator("#chatbot").is_visible() and page.locator("#message textarea").is_visible()
    for elem_id in ("regenerate", "undo", "clear", "settings", "export"):
        assert page.locator(f"#{elem_id}").is_visible(), elem_id
    assert not page.locator("#stop").is_visible(), "Stop shows only while an answer runs"
    assert page.locator("#export_file").is_hidden(), "no empty download box"
    assert "tiny-gill" in page.locator("#header").inner_text()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "empty.png"))


QUESTION = "How are these two pictures different?"


def test_two_images_and_a_message_stream_a_labelled_image(page):
    record_chat_changes(page)
    send(page, QUESTION, [CAT, ROCKET])
    page.get_by_text("Retrieved (score").first.wait_for()
    wait_idle(page)
    assert user_texts(page) == [QUESTION]
    assert user_messages(page).locator("img").count() == 2
    assert bot_messages(page).locator("img").count() >= 1
    assert "decision: p(generate) =" in answers_text(page)
    snapshots = [s for s in page.evaluate("window.__chat") if s.strip()]
    assert len(set(snapshots)) >= 2, "the answer appears step by step, not all at once"


def test_change_settings_and_generate(page):
    page.locator("#settings").get_by_text("Settings").first.click()
    choose(page, "set_mode", "generate")
    set_slider(page, "set_max_new_tokens", 10)
    page.locator("#set_mode").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "settings.png"), full_page=True)
    send(page, "Now draw me a picture of it.")
    page.get_by_text("Generated (seed").first.wait_for()
    wait_idle(page)
    assert user_texts(page) == [QUESTION, "Now draw me a picture of it."]
    assert "Retrieved (score" in answers_text(page) and "Generated (seed" in answers_text(page)
    page.locator("#settings").get_by_text("Settings").first.click()  # close it again
    page.set_viewport_size({"width": 1280, "height": 1500})  # a tall window: both kinds of image in view
    page.locator("#chatbot .message-row.user-row").last.evaluate("e => e.scrollIntoView({block: 'center'})")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / "conversation.png"))
    page.set_viewport_size({"width": 1280, "height": 1000})


def generated_seeds(page) -> list[str]:
    return [line for line in answers_text(page).splitlines() if "Generated (seed" in line]


def test_regenerate_gives_a_new_seed(page):
    before = generated_seeds(page)
    assert before
    page.locator("#regenerate").click()
    page.wait_for_function(
        "old => [...document.querySelectorAll('#chatbot .message-row.bot-row')].some(r =>"
        " r.innerText.includes('Generated (seed') && !old.some(o => r.innerText.includes(o)))",
        arg=before,
    )
    wait_idle(page)
    assert user_texts(page) == [QUESTION, "Now draw me a picture of it."]
    after = generated_seeds(page)
    assert after and not set(after) & set(before)


def test_undo_removes_the_last_exchange(page):
    page.locator("#undo").click()
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('Now draw me')")
    assert user_texts(page) == [QUESTION]
    assert "Generated (seed" not in chat_text(page) and "Retrieved (score" in chat_text(page)


def test_stop_mid_stream_keeps_the_text(page):
    page.locator("#settings").get_by_text("Settings").first.click()
    choose(page, "set_mode", "text")
    set_slider(page, "set_max_new_tokens", 400)
    page.locator("#settings").get_by_text("Settings").first.click()
    LM_DELAY_S["value"] = 0.05  # 400 tokens would take > 20 s
    send(page, "hello")
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('#chatbot .message-row')];"
        " const last = r[r.length - 1]; return last.classList.contains('bot-row')"
        " && r[r.length - 2].innerText.includes('hello')"
        " && last.innerText.trim().length > 3 && !last.innerText.includes('…'); }"
    )
    page.locator("#stop").click()
    try:
        page.get_by_text("(stopped)").first.wait_for(timeout=20_000)
    except playwright_api.TimeoutError:
        page.screenshot(path="/tmp/stop_failed.png", full_page=True)
        raise AssertionError(f"no '(stopped)' mark; the chat shows: {chat_text(page)[-600:]}") from None
    LM_DELAY_S["value"] = 0.0
    wait_idle(page)
    assert user_texts(page) == [QUESTION, "hello"]
    last = bot_messages(page).last.inner_text()
    assert "(stopped)" in last and len(last.replace("(stopped)", "").strip()) > 3


def test_bad_file_is_explained_in_the_chat(page, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not an image")
    send(page, "what is in this file?", [f])
    toast = page.locator(".toast-wrap").filter(has_text="not a readable image").first
    toast.wait_for()  # a notice that clears itself, not a bot turn
    assert "notes.txt" in toast.inner_text()
    wait_idle(page)
    assert user_texts(page) == [QUESTION, "hello"]  # the conversation is intact
    assert "not a readable image" not in chat_text(page)
    assert page.locator("#message textarea").input_value() == "what is in this file?", "the refused message stays"
    assert page.locator("#message .thumbnail-item, #message .file-preview, #message .upload-item").count() >= 1


def test_export_html_and_json_then_load_back(page, tmp_path):
    html_file = download(page, "export_html", tmp_path)
    html = html_file.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "Retrieved" in html

    json_file = download(page, "export_json", tmp_path)
    data = json.loads(json_file.read_text())
    assert [t["role"] for t in data["turns"]] == ["user", "assistant"] * 2

    delete_chat(page)
    with page.expect_file_chooser() as chooser:
        page.locator("#load_json").click()
    chooser.value.set_files(str(json_file))
    page.get_by_text("Loaded a conversation of 2 exchanges").first.wait_for()
    wait_idle(page)
    assert user_texts(page) == [QUESTION, "hello"]
    assert page.locator("#chatbot img").count() >= 3


def test_edit_a_past_message_branches_from_it(page):
    k = user_texts(page).index(QUESTION)
    page.locator("#chatbot button[aria-label='Edit']:visible").nth(k).click()  # one edit button per text you sent
    editor = page.locator("#chatbot textarea").first
    assert editor.input_value() == QUESTION
    editor.fill("Which one is the cat?")
    page.locator("#chatbot button[aria-label='Submit']").first.click()
    page.get_by_text("Which one is the cat?").first.wait_for()
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('hello')")
    wait_idle(page)
    assert user_texts(page) == ["Which one is the cat?"]
    assert user_messages(page).locator("img").count() == 2  # its images stay
    assert "Loaded a conversation" not in chat_text(page)
