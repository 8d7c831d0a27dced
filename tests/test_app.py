"""The chat app through its API: gradio_client drives multi-turn conversations against the app launched in-process
on 127.0.0.1 with tiny-gill (one gradio_client.Client = one browser session)."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app  # noqa: E402
from fromage_gill.chat.messages import MAX_IMAGES_PER_MESSAGE  # noqa: E402
from fromage_gill.retrieve import ImageIndex  # noqa: E402

ASSETS = ROOT / "assets" / "images"
CAT, ROCKET = ASSETS / "chelsea.jpg", ASSETS / "rocket.jpg"
IMAGES = dict(image_logit_bias=20.0)  # makes the random tiny model show images at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_gill):
    photos = app.load_indexes(None, tiny_gill)["assets"]  # the shipped tiny-gill index of assets/images
    astronaut = ImageIndex(photos.vectors[:1], [photos.record(0)], photos.fingerprint, directory=photos.directory)
    indexes = {"photos": photos, "astronaut only": astronaut}  # two indexes: the app offers the choice
    demo = app.build_demo(
        tiny_gill,
        app.AppOptions(
            indexes=indexes, max_queue=8, concurrency=1, defaults=dict(max_new_tokens=8, num_inference_steps=2)
        ),
    )
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def client(server):
    return Client(server, verbose=False)


# an inline image, as a link to itself (a click opens it full size)
IMAGE_MD = re.compile(r"\[!\[[^\]]*\]\(/gradio_api/file=([^)\s]+)\)\]\(/gradio_api/file=[^)\s]+\)")


def texts(message: dict) -> str:
    """The message's text parts (a part that is only an inline image is not text)."""
    return " ".join(
        c["text"] for c in message["content"] if c.get("type") == "text" and not IMAGE_MD.fullmatch(c["text"])
    )


def files(message: dict) -> list[str]:
    """The images a message shows: inline in its markdown (the app's way) or as file parts."""
    inline = [f for c in message["content"] if c.get("type") == "text" for f in IMAGE_MD.findall(c["text"])]
    return inline + [c["file"] for c in message["content"] if c.get("type") == "file"]


def kinds(message: dict) -> list[str]:
    """What each part of a (grouped) message is: "image" (a part that is only an inline image) or "text"."""
    return ["image" if IMAGE_MD.fullmatch(c.get("text", "")) else c.get("type") for c in message["content"]]


def last_note(client: Client) -> str:
    """The last toast the session was shown (errors are toasts, not chat messages; /history keeps their text)."""
    notes = history(client)["notes"]
    return notes[-1] if notes else ""


def grouped(chat: list[dict]) -> list[dict]:
    """Consecutive messages of one role as one (the app shows each part of a user turn as its own message)."""
    out: list[dict] = []
    for m in chat:
        if out and out[-1]["role"] == m["role"] == "user":
            out[-1] = {**out[-1], "content": out[-1]["content"] + m["content"]}
        else:
            out.append(m)
    return out


def history(client: Client) -> dict:
    return client.predict(api_name="/history")


def send(client: Client, text: str, images=(), **settings):
    msg = {"text": text, "files": [handle_file(str(p)) for p in images]}
    chat, _box = client.predict(message=msg, api_name="/send", **settings)
    return grouped(chat)


def png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, written directly (a 20000x20000 one is ~60 KB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- conversation


def test_multi_turn_conversation_with_interleaved_images(client):
    chat = send(client, "How are these two pictures different?", [CAT, ROCKET], mode="retrieve", **IMAGES)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    user = chat[0]
    assert len(files(user)) == 2 and texts(user) == "How are these two pictures different?"
    assert kinds(user) == ["image", "image", "text"]  # images first, in order
    answer = chat[1]
    assert len(answer["content"]) == 1, "one answer is one message: its text, images and labels"
    assert files(answer), "mode=retrieve with a large image bias shows an image"
    assert "**Retrieved** (score" in texts(answer)
    assert "decision: p(generate) =" in texts(answer)
    for f in files(answer):
        assert Path(f).is_file()

    chat = send(client, "Draw it <image> again", [CAT], mode="generate", **IMAGES)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert kinds(chat[2]) == ["text", "image", "text"]  # <image> placed it mid-text
    assert "**Generated** (seed" in texts(chat[3])

    h = history(client)
    assert [t["role"] for t in h["turns"]] == ["user", "assistant"] * 2
    assert set(h["seeds"]) == {"1", "3"} and all(isinstance(s, int) for s in h["seeds"].values())
    assert h["settings"]["mode"] == "generate" and h["settings"]["num_inference_steps"] == 2


def test_answer_streams(client):
    job = client.submit(message={"text": "hello", "files": []}, mode="text", max_new_tokens=48, api_name="/send")
    job.result()
    answers = [texts(out[0][-1]) for out in job.outputs() if out[0] and out[0][-1]["role"] == "assistant"]
    distinct = [a for i, a in enumerate(answers) if i == 0 or a != answers[i - 1]]
    assert len(distinct) >= 3, f"expected the answer to arrive in pieces, got {distinct}"
    grown = [a for a in distinct if a.strip(" …")]
    assert all(b.startswith(a.rstrip()) for a, b in zip(grown, grown[1:], strict=False)), grown


def test_regenerate_undo_clear(client):
    send(client, "hello", mode="text", max_new_tokens=6)
    first = history(client)
    chat = grouped(client.predict(mode="text", max_new_tokens=6, temperature=1.0, api_name="/regenerate")[0])
    second = history(client)
    assert len(second["turns"]) == 2 and [m["role"] for m in chat] == ["user", "assistant"]
    assert second["seeds"]["1"] != first["seeds"]["1"], "Regenerate uses a new seed"

    send(client, "and again", mode="text", max_new_tokens=6)
    assert len(history(client)["turns"]) == 4
    chat = grouped(client.predict(api_name="/undo"))
    assert len(chat) == 2 and len(history(client)["turns"]) == 2

    chat, _box = client.predict(api_name="/clear")
    assert chat == [] and history(client)["turns"] == []


def test_regenerate_with_fixed_seed_setting_still_changes_seed(client):
    send(client, "hi", mode="text", max_new_tokens=4, seed="7")
    assert history(client)["seeds"]["1"] == 7
    client.predict(mode="text", max_new_tokens=4, seed="7", api_name="/regenerate")
    assert history(client)["seeds"]["1"] != 7


def test_stop_mid_stream_keeps_what_streamed(client):
    job = client.submit(
        message={"text": "Talk for a long time", "files": []}, mode="text", max_new_tokens=400, api_name="/send"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        outs = job.outputs()
        if outs and outs[-1][0] and len(texts(outs[-1][0][-1])) > 5 and outs[-1][0][-1]["role"] == "assistant":
            break
        time.sleep(0.05)
    client.predict(api_name="/stop")
    chat, _ = job.result()
    h = history(client)
    assert h["end_reasons"] == {"1": "stopped"}
    assert texts(chat[-1]).strip(), "the text that streamed before Stop stays"
    # the conversation continues normally after a stop
    send(client, "ok", mode="text", max_new_tokens=4)
    assert len(history(client)["turns"]) == 4


def test_second_message_while_answering_is_queued(client):
    job = client.submit(message={"text": "long", "files": []}, mode="text", max_new_tokens=400, api_name="/send")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (job.outputs() and job.outputs()[-1][0]):
        time.sleep(0.05)
    queued = client.submit(message={"text": "me too", "files": []}, mode="text", max_new_tokens=3, api_name="/send")
    while time.monotonic() < deadline and "Queued" not in last_note(client):
        time.sleep(0.05)
    client.predict(api_name="/stop")
    job.result()
    queued.result()
    h = history(client)
    assert [t["segments"][0]["text"] for t in h["turns"] if t["role"] == "user"] == ["long", "me too"]


def test_edit_past_message_branches(client):
    send(client, "first question", [CAT], mode="text", max_new_tokens=4)
    send(client, "second question", mode="text", max_new_tokens=4)
    chat, _ = client.predict(
        turn_index=0, text="a better first question", mode="text", max_new_tokens=4, api_name="/edit"
    )
    chat = grouped(chat)
    h = history(client)
    assert len(h["turns"]) == 2
    assert h["turns"][0]["segments"] == [{"image": "image", "source": "user"}, {"text": "a better first question"}]
    assert len(files(chat[0])) == 1  # the image of the edited message is kept

    chat, _ = client.predict(turn_index=1, text="x", api_name="/edit")  # an answer, not a user message
    assert "is not one of your messages" in last_note(client) and len(history(client)["turns"]) == 2
    assert len(grouped(chat)) == 2, "an error is a toast, not a message in the chat"


def test_sessions_are_isolated(server):
    a, b = Client(server, verbose=False), Client(server, verbose=False)
    send(a, "I am A", mode="text", max_new_tokens=3)
    send(b, "I am B", mode="text", max_new_tokens=3)
    send(a, "still A", mode="text", max_new_tokens=3)
    ha, hb = history(a), history(b)
    assert [t["segments"][0]["text"] for t in ha["turns"] if t["role"] == "user"] == ["I am A", "still A"]
    assert [t["segments"][0]["text"] for t in hb["turns"] if t["role"] == "user"] == ["I am B"]


def test_busy_message_says_how_many_are_ahead(server, tiny_gill, monkeypatch):
    forward = tiny_gill.model.forward_lm

    def slow_forward(*args, **kwargs):  # >= 4 s for the long answer, however fast the machine: b must find it busy
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_gill.model, "forward_lm", slow_forward)
    a, b = Client(server, verbose=False), Client(server, verbose=False)
    long_job = a.submit(message={"text": "long", "files": []}, mode="text", max_new_tokens=400, api_name="/send")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (long_job.outputs() and long_job.outputs()[-1][0]):
        time.sleep(0.05)
    waiting = b.submit(message={"text": "me too", "files": []}, mode="text", max_new_tokens=3, api_name="/send")
    seen = ""
    while time.monotonic() < deadline and "ahead of you" not in seen:
        outs = waiting.outputs()
        seen = texts(outs[-1][0][-1]) if outs and outs[-1][0] else ""
        time.sleep(0.05)
    a.predict(api_name="/stop")
    long_job.result()
    waiting.result()
    assert "Busy: 1 ahead of you" in seen
    assert len(history(b)["turns"]) == 2, "the queued message runs once the model is free"


def test_index_choice_decides_where_images_come_from(client):
    chat = send(client, "show me", mode="retrieve", max_images=1, index="astronaut only", **IMAGES)
    assert "**Retrieved** (score" in texts(chat[-1]) and "astronaut Eileen Collins" in texts(chat[-1])
    # switching index mid-conversation keeps the conversation
    chat = send(client, "and another", mode="retrieve", max_images=1, index="photos", **IMAGES)
    assert len(history(client)["turns"]) == 4 and "**Retrieved** (score" in texts(chat[-1])


def test_long_conversation_leaves_out_old_turns_with_a_note(client):
    for k in range(5):
        send(client, f"turn {k}: " + "tell me more about the picture " * 25, mode="text", max_new_tokens=8)
    h = history(client)
    assert len(h["turns"]) == 10, "every turn stays in the visible chat"
    notes = [n for n in h["notes"] if "left out of the prompt" in n]
    assert notes, h["notes"]


# ---------------------------------------------------------------------------------------------- export / import


def test_export_html_is_self_contained(client):
    send(client, "look", [CAT], mode="generate", **IMAGES)
    page = Path(client.predict(api_name="/export_html")).read_text()
    assert page.count("data:image/png;base64,") >= 2  # the user's photo and the generated image
    assert "<b>Generated</b> (seed" in page and "look" in page
    assert 'src="http' not in page and 'src="/' not in page


def test_export_json_loads_back_and_continues(server, client):
    send(client, "look", [CAT], mode="retrieve", **IMAGES)
    send(client, "more", mode="text", max_new_tokens=3)
    before = history(client)
    exported = client.predict(api_name="/export_json")
    data = json.loads(Path(exported).read_text())
    assert data["format"] == "fromage_gill.chat" and data["settings"]["mode"] == "text"
    answers = {str(i): t["seed"] for i, t in enumerate(data["turns"]) if t["role"] == "assistant"}
    assert answers == before["seeds"]  # each answer holds its seed

    other = Client(server, verbose=False)
    out = other.predict(file=handle_file(exported), api_name="/load_json")
    chat, settings_mode = grouped(out[0]), out[1]
    assert settings_mode == "text"  # the settings come back too
    after = history(other)
    assert after["turns"] == before["turns"] and after["seeds"] == before["seeds"]
    assert "Loaded a conversation of 2 exchanges" in last_note(other) and len(chat) == 4
    send(other, "and now?", mode="text", max_new_tokens=3)
    assert len(history(other)["turns"]) == 6


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def chatting(client):
    """A client with one exchange already in its conversation."""
    send(client, "hello", [CAT], mode="text", max_new_tokens=3)
    return client, history(client)["turns"]


def assert_refused(client, chat, turns_before, *needles):
    chat = grouped(chat)
    last = last_note(client)
    for needle in needles:
        assert needle.lower() in last.lower(), (needle, last)
    assert history(client)["turns"] == turns_before, "the conversation so far stays intact"
    assert [m["role"] for m in chat] == ["user", "assistant"], "the error is a toast, not a chat message"


def test_non_image_file(chatting, tmp_path):
    client, turns = chatting
    f = tmp_path / "notes.txt"
    f.write_text("not an image")
    assert_refused(client, send(client, "what is this", [f]), turns, "notes.txt", "not a readable image")


def test_corrupt_image(chatting, tmp_path):
    client, turns = chatting
    f = tmp_path / "broken.png"
    f.write_bytes(CAT.read_bytes()[:600])  # a JPEG cut short
    assert_refused(client, send(client, "what is this", [f]), turns, "broken.png")


def test_huge_png(chatting, tmp_path):
    client, turns = chatting
    f = tmp_path / "huge.png"
    f.write_bytes(png_bytes(20000, 20000))
    assert_refused(client, send(client, "what is this", [f]), turns, "huge.png", "pixels", "resize it")


def test_empty_message(chatting):
    client, turns = chatting
    assert_refused(client, send(client, "   "), turns, "empty")


def test_message_longer_than_the_context(chatting):
    client, turns = chatting
    chat = send(client, "word " * 3000, mode="text")
    assert_refused(client, chat, turns, "fits 512")


def test_twenty_images(chatting):
    client, turns = chatting
    chat = send(client, "so many", [CAT] * 20)
    assert_refused(client, chat, turns, f"limit of {MAX_IMAGES_PER_MESSAGE}")


def test_regenerate_with_no_history(client):
    chat, _ = client.predict(api_name="/regenerate")
    assert chat == [] and last_note(client) == "Nothing to regenerate yet: send a message first."
    assert history(client)["turns"] == []


def test_bad_setting_is_reported(chatting):
    client, turns = chatting
    assert_refused(client, send(client, "hi", seed="lucky"), turns, "seed must be a whole number")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'["a", "list"]',
        b'{"format": "something else"}',
        b'{"format": "fromage_gill.chat", "version": 1, "turns": [{"role": "robot", "segments": []}]}',
        b'{"format": "fromage_gill.chat", "version": 1, "turns": [{"role": "user", "segments": [{"type": "image", '
        b'"png": "!!!"}]}]}',
        b'{"format": "fromage_gill.chat", "version": 1, "turns": [], "seeds": {"a": "b"}}',
        b'{"format": "fromage_gill.chat", "version": 1, "turns": [], "settings": {"temperature": "hot"}}',
        b'{"format": "fromage_gill.chat", "version": 7, "turns": []}',
    ],
)
def test_nonsense_export_json(chatting, tmp_path, content):
    client, turns = chatting
    f = tmp_path / "edited.json"
    f.write_bytes(content)
    out = client.predict(file=handle_file(str(f)), api_name="/load_json")
    assert_refused(client, out[0], turns, "could not load the conversation")


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("entry", ["app.py", "fromage-gill serve"])
def test_no_weights_offline_says_how_to_start_the_offline_demo(entry, capsys):
    """No flags, no published weights on disk, no network (HF_HUB_OFFLINE=1): one line with the way out."""
    from fromage_gill import cli

    rc = app.main([]) if entry == "app.py" else cli.main(["serve"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "toy-gill" in line]
    assert len(lines) == 1 and "python app.py --model toy-gill" in lines[0], err


def test_clip_flag_attaches_magic_clip(monkeypatch):
    """--clip gives the app's 'magic' decoding its CLIP; an unknown one is one clear line, not a traceback."""
    from fromage_gill import magic

    seen = {}

    class Demo:  # stands in for the Blocks: records that serve() got as far as launching
        def launch(self, **kwargs):
            seen["launched"] = kwargs

    def build_demo(pipeline, options, handlers=None):
        seen["pipeline"] = pipeline
        return Demo()

    monkeypatch.setattr(app, "build_demo", build_demo)
    assert app.main(["--model", "tiny-gill", "--clip", "tiny-magic", "--port", "7999"]) == 0
    assert seen["launched"]["server_port"] == 7999
    assert magic.attached_clip(seen["pipeline"]) is not None


def test_app_does_not_import_the_commands():
    """`fromage-gill serve` runs app.py; app.py reads its flags from fromage_gill.chat.options, not from commands/."""
    code = (
        "import contextlib, sys; sys.path.insert(0, sys.argv[1]); import app\n"
        "with contextlib.suppress(SystemExit): app.main(['--help'])  # builds the parser\n"
        "assert not [m for m in sys.modules if m.startswith('fromage_gill.commands')], 'app.py imports commands'"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], timeout=120, capture_output=True, text=True)
    assert out.returncode == 0 and "--max-queue" in out.stdout, out.stdout + out.stderr


def test_clip_flag_unknown_source(tmp_path, capsys):
    rc = app.main(["--model", "tiny-gill", "--clip", str(tmp_path / "no-such-clip")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "--clip" in err, err
