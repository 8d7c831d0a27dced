"""The app's gradio-free logic: the model gate, building and editing messages, labels, reading exports, and that
all of fromage_gill.chat imports and runs without gradio."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from fromage_gill.chat.export import ChatExportError, read_export
from fromage_gill.chat.gate import ModelGate
from fromage_gill.chat.labels import image_label
from fromage_gill.chat.messages import MAX_IMAGES_PER_MESSAGE, build_message, edited_message
from fromage_gill.chat.session import MIN_SHOWN_PX, ChatSession
from fromage_gill.generate.prompt import Decision, ImageSegment
from fromage_gill.images import ImageError


def test_gate_admits_in_arrival_order_and_counts_who_is_ahead():
    gate = ModelGate(slots=1)
    a, b, c = gate.join(), gate.join(), gate.join()
    assert gate.wait(a, 0) and not gate.wait(b, 0.01)
    assert [gate.ahead(t) for t in (a, b, c)] == [0, 1, 2]
    gate.leave(b)  # b gave up while waiting (Stop, closed tab): c moves up
    assert gate.ahead(c) == 1
    gate.leave(a)
    assert gate.wait(c, 0) and gate.ahead(c) == 0 and gate.busy == 1
    gate.leave(c)
    assert gate.busy == 0


def test_gate_wakes_the_next_waiter():
    gate = ModelGate(slots=2)
    tickets = [gate.join() for _ in range(3)]
    assert gate.wait(tickets[1], 0) and gate.ahead(tickets[2]) == 2
    got = []
    waiter = threading.Thread(target=lambda: got.append(gate.wait(tickets[2], 10)))
    waiter.start()
    gate.leave(tickets[0])
    waiter.join(10)
    assert got == [True]
    with pytest.raises(ValueError, match="slots"):
        ModelGate(0)


def test_build_message_orders_images_and_text(tmp_path, images):
    paths = []
    for i, img in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    segs = build_message("look: <image> and <image> what?", [str(p) for p in paths])
    kinds = ["img" if isinstance(s, Image.Image) else s for s in segs]
    assert kinds == ["img", "look:", "img", "and", "img", "what?"]  # the unmarked first image leads
    assert segs[0].size == images[0].size and segs[4].size == images[2].size
    assert build_message("hi", [{"path": str(paths[0]), "orig_name": "cat.png"}])[1] == "hi"


def test_build_message_refusals(tmp_path, images):
    with pytest.raises(ValueError, match="empty"):
        build_message("  ", [])
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt: not a readable image"):
        build_message("hi", [str(bad)])
    with pytest.raises(ValueError, match=f"limit of {MAX_IMAGES_PER_MESSAGE}"):
        build_message("hi", [str(bad)] * (MAX_IMAGES_PER_MESSAGE + 1))


def test_edited_message(images):
    img = images[0]
    segs = [img, "first", img, "second"]
    assert edited_message(segs, "new", part=3) == [img, "first", img, "new"]
    assert edited_message(segs, "", part=1) == [img, img, "second"]
    assert edited_message(segs, "all new") == [img, "all new", img]
    assert edited_message([img], "added") == [img, "added"]
    with pytest.raises(ValueError, match="not text"):
        edited_message(segs, "x", part=0)
    with pytest.raises(ValueError, match="empty"):
        edited_message(["only text"], " ")


def test_image_label():
    seg = ImageSegment(Image.new("RGB", (4, 4)), "retrieved", 0.4567, "a *cat*", "https://x.org/c.jpg")
    assert image_label(seg) == r"**Retrieved** (score 0.457) · a \*cat\* · [source](https://x.org/c.jpg)"
    seg = dataclasses.replace(seg, url="../../images/cat.jpg")  # a local path is not a link
    assert "[source]" not in image_label(seg)
    seg = dataclasses.replace(seg, source="generated", seed=12, decision=Decision(0.7, 0.3))
    assert image_label(seg) == (
        "**Generated** (seed 12)  \n<small>decision: p(generate) = 0.70, p(retrieve) = 0.30</small>"
    )
    assert image_label(dataclasses.replace(seg, source="user")) == ""


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{oops", "not valid JSON"),
        (b"[1, 2]", "not a saved chat"),
        (b'{"format": "fromage_gill.chat", "version": 2}', "unsupported export version 2"),
        (b'{"format": "fromage_gill.chat", "version": 1, "settings": []}', "'settings' must be a JSON object"),
        # a crafted export: json.loads would recurse until RecursionError (an uncaught traceback in the app)
        (b"[" * 200_000 + b"]" * 200_000, "nests more than 16 levels deep"),
        (b'{"format": "fromage_gill.chat", "version": 1, "turns": [], "score": NaN}', "not a number"),
    ],
)
def test_read_export_refusals(tmp_path, content, match):
    f = tmp_path / "e.json"
    f.write_bytes(content)
    with pytest.raises(ChatExportError, match=match):
        read_export(f)


def test_read_export_defaults_its_settings():
    data = read_export(b'{"format": "fromage_gill.chat", "version": 1, "turns": []}')
    assert data["settings"] == {}


def test_session_files_are_removed_on_close(images):
    class NoChat:
        history: list = []

    session = ChatSession(NoChat())
    small = Path(session.image_path(images[0]))
    assert small.is_file() and Image.open(small).size[0] >= MIN_SHOWN_PX  # shown enlarged
    assert session.image_path(images[0]) == str(small)  # written once per content
    session.close()
    assert not session.image_dir.exists()


def test_library_side_imports_without_gradio():
    code = (
        "import sys; sys.modules['gradio'] = None; import fromage_gill.chat.session, fromage_gill.commands.serve, "
        "fromage_gill.cli; fromage_gill.cli.build_parser().parse_args(['serve', '--model', 'tiny-gill'])"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


HANDLER_WITHOUT_GRADIO = """
import importlib, pkgutil, sys
sys.modules["gradio"] = None  # any import of gradio fails
import fromage_gill.chat
for info in pkgutil.iter_modules(fromage_gill.chat.__path__):
    importlib.import_module("fromage_gill.chat." + info.name)
from fromage_gill import load_pipeline
from fromage_gill.chat.handlers import ChatHandlers
h = ChatHandlers(load_pipeline("tiny-gill", device="cpu", dtype="fp32"))
reply = list(h.send(None, {"text": "hello", "files": []}, mode="text", max_new_tokens=3))[-1]
assert [m["role"] for m in reply.messages] == ["user", "assistant"], reply.messages
assert h.history(reply.session)["end_reasons"] == {"1": "max_new_tokens"}
print("modules:", *sorted(info.name for info in pkgutil.iter_modules(fromage_gill.chat.__path__)))
"""


def test_every_chat_module_and_a_handler_run_without_gradio():
    out = subprocess.run(
        [sys.executable, "-c", HANDLER_WITHOUT_GRADIO], check=True, timeout=300, capture_output=True, text=True
    )
    modules = out.stdout.split("modules:")[1].split()
    assert {"controls", "export", "gate", "handlers", "labels", "messages", "options", "page", "session"} <= set(
        modules
    ), out.stdout
