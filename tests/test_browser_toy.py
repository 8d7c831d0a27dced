"""The offline demo as a new user meets it: ``python app.py --model toy-gill`` on the shipped toy checkpoints, in
headless Chromium: describe an uploaded world image, show a photo from the gallery, draw a new picture (each in a
new conversation). Screenshots go to a temporary folder, or to $FROMAGE_GILL_SCREENSHOTS
(``FROMAGE_GILL_SCREENSHOTS=docs/screenshots pytest tests/test_browser_toy.py`` refreshes the README's).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urljoin

import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from browser_helpers import (  # noqa: E402 (after the skips)
    MARKS,
    answers_text,
    bot_messages,
    free_port,
    open_page,
    send,
    wait_idle,
)

from fromage_gill.toy import world as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("FROMAGE_GILL_SCREENSHOTS") or tempfile.mkdtemp(prefix="fromage_gill_shots_"))
# A held-out scene (its combination of attributes never occurs in training), kept as a PNG the user uploads.
SCENE = W.Scene((W.Thing("ring", "blue", "large"),), "white", position="center")

pytestmark = MARKS

sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def server(toy_gill):
    import app

    # What `python app.py --model toy-gill` builds: the model's own settings, its gallery as the index.
    options = app.AppOptions(indexes=app.load_indexes(None, toy_gill))
    demo = app.build_demo(toy_gill, options)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_style())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    with open_page(server, height=1400) as pg:
        yield pg


ANSWER_JS = """([text, mark]) => {
    const rows = [...document.querySelectorAll('#chatbot .message-row')];
    const asked = rows.map(r => r.classList.contains('user-row') && r.innerText.trim() === text).lastIndexOf(true);
    if (asked < 0) return null;
    const answer = rows.slice(asked + 1).filter(r => r.classList.contains('bot-row')).map(r => r.innerText).join('\\n');
    return answer.includes(mark) ? answer : null;
}"""


def exchange(page, text: str, files=(), *, wait_for: str = "") -> str:
    """Send a message and return the text of the rows that answer it (the chat shows an answer's text and its
    image as separate rows) once ``wait_for`` (default: any text) is among them and the answer is complete."""
    send(page, text, files)
    page.wait_for_function(ANSWER_JS, arg=[text, wait_for or " "])
    wait_idle(page)
    return page.evaluate(ANSWER_JS, [text, wait_for])


def test_scene_is_held_out():
    assert SCENE.split == "test"


def new_conversation(page):
    """The toy model answers the first request of a conversation best (its LM never saw an answer's image tokens
    inside a dialogue; docs/toy.md), so each request starts a new one, as a user would with New chat."""
    page.locator("#new_chat").click()
    page.wait_for_function("() => !document.querySelector('#chatbot .message-row')")


def shoot(page, name: str):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / name), clip={"x": 0, "y": 0, "width": 1280, "height": 760})


def test_describes_an_uploaded_world_image(page, tmp_path):
    assert "toy-gill" in page.locator("#header").inner_text()
    path = tmp_path / "shape.png"
    SCENE.render().save(path)
    answer = exchange(page, "What is in this image?", [path]).lower()
    assert "blue" in answer and "ring" in answer, answer
    # Asked what it sees, not for a picture: the answer is words only
    assert "Retrieved (score" not in answer and "Generated (seed" not in answer, answer
    assert bot_messages(page).locator("img").count() == 0
    shoot(page, "toy-describe.png")


def test_shows_a_photo_from_the_gallery(page):
    new_conversation(page)
    answer = exchange(page, "Show me a photo of a green triangle.", wait_for="Retrieved (score")
    assert "green triangle" in answer and "Retrieved (score" in answer, answer
    assert "green triangle" in answer.split("Retrieved (score")[1], answer  # the gallery image's own caption
    assert bot_messages(page).locator("img").first.is_visible()
    assert W.dominant_colour(shown_image(page)) == "green"
    shoot(page, "toy-show.png")


def shown_image(page) -> Image.Image:
    """The answer's last image as the browser received it."""
    src = bot_messages(page).locator("img").last.get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(urljoin(page.url, src)).body())).convert("RGB")


def test_draws_what_is_asked(page):
    new_conversation(page)
    # A fixed seed in Settings, as a user would set one to get the same picture again (the default is random)
    page.locator("#settings").get_by_text("Settings").first.click()
    page.locator("#set_seed textarea, #set_seed input").first.fill("0")
    page.locator("#settings").get_by_text("Settings").first.click()
    answer = exchange(page, "Draw a red circle.", wait_for="Generated (seed")
    assert "red circle" in answer and "Generated (seed" in answer, answer
    assert "Retrieved (score" not in answers_text(page)
    assert W.dominant_colour(shown_image(page)) == "red"
    shoot(page, "toy-draw.png")
