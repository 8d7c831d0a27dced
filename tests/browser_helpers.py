"""Driving the chat app in headless Chromium (Debian's, at /usr/bin/chromium) with Playwright: shared by the
browser tests. Elements are found by their ``elem_id``."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)",
    ),
]


@contextmanager
def open_page(url: str, *, height: int = 1000, **context_options):
    """A Chromium page on the app at ``url``, once its message box is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": height}, **context_options).new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#message textarea")
        try:
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bot_messages(page):
    return page.locator("#chatbot .message-row.bot-row")


def user_messages(page):
    """The chat shows each part of a message (an image, a text) as its own row."""
    return page.locator("#chatbot .message-row.user-row")


def user_texts(page) -> list[str]:
    rows = user_messages(page)
    return [rows.nth(i).inner_text().strip() for i in range(rows.count()) if not rows.nth(i).locator("img").count()]


def answers_text(page) -> str:
    return "\n".join(bot_messages(page).all_inner_texts())


def chat_text(page) -> str:
    return page.locator("#chatbot").inner_text()


def send(page, text: str, files=()):
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(
            "n => document.querySelectorAll('#message .thumbnail-item, #message img').length >= n", arg=len(files)
        )
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def wait_idle(page):
    """Until no event is running (gradio marks pending outputs with a visible status tracker)."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => !document.querySelector('#chatbot .generating, #chatbot [data-testid=\"status-tracker\"]:not(.hide)')"
        " && !document.querySelector('#stop.generating')"
    )
    page.wait_for_timeout(300)


def delete_chat(page):
    """The Delete chat button, then the confirmation it asks for; until the chat is empty."""
    page.locator("#clear").click()
    page.locator("#confirm_delete").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length === 0")
