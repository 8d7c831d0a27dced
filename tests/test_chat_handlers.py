"""The app's handlers (fromage_gill/chat/handlers.py) called directly on tiny-gill, without gradio: what each
button does to the conversation and what it shows. tests/test_app.py drives the same through the gradio API."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
from pathlib import Path

import pytest

from fromage_gill.chat import controls, handlers
from fromage_gill.chat.handlers import ChatHandlers, Reply
from fromage_gill.chat.messages import chatbot_messages
from fromage_gill.chat.options import AppOptions, add_serve_args, load_indexes
from fromage_gill.chat.page import example_messages, header_markdown
from fromage_gill.retrieve.index import ImageIndex

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "images"
CAT = ASSETS / "chelsea.jpg"
TEXT = dict(mode="text", max_new_tokens=4)
FILE = "/gradio_api/file="
IMAGES = dict(mode="retrieve", image_logit_bias=20.0, max_images=1, max_new_tokens=6)  # an image at once


@pytest.fixture(scope="module")
def indexes(tiny_gill):
    photos = load_indexes(None, tiny_gill)["assets"]  # the shipped tiny-gill index of assets/images
    astronaut = ImageIndex(photos.vectors[:1], [photos.record(0)], photos.fingerprint, directory=photos.directory)
    return {"photos": photos, "astronaut only": astronaut}


@pytest.fixture
def h(tiny_gill, indexes, tmp_path):
    # one turn at a time, so a second visitor finds the model busy (test_busy_message_says_how_many_are_ahead)
    options = AppOptions(
        indexes=indexes, concurrency=1, defaults=dict(num_inference_steps=2), cache_dir=tmp_path / "cache"
    )
    return ChatHandlers(tiny_gill, options)


def last(replies) -> Reply:
    replies = list(replies)
    assert replies and all(isinstance(r, Reply) for r in replies)
    return replies[-1]


def shown_text(reply: Reply, k: int = -1) -> str:
    content = reply.messages[k]["content"]
    assert isinstance(content, str), "every message is one markdown text (images inline)"
    return content


def error(reply: Reply) -> str:
    """The reply's error toast (errors are never chat messages)."""
    assert all(m["content"].find("**Error:**") < 0 for m in reply.messages)
    return " ".join(reply.errors)


def user_texts(session) -> list[str]:
    return [t["segments"][-1]["text"] for t in session.summary()["turns"] if t["role"] == "user"]


# ---------------------------------------------------------------------------------------------- turns


def test_send_shows_the_message_and_streams_the_answer(h):
    replies = list(h.send(None, {"text": "look", "files": [str(CAT)]}, **IMAGES))
    session = replies[-1].session
    assert all(r.session is session for r in replies)  # the first action makes the tab's session
    cleared = [r.clear_box for r in replies]
    assert cleared.count(True) == 1, "cleared once, when the model took the message"
    assert [r.running for r in replies] == [True] * (len(replies) - 1) + [False]
    assert [m["role"] for m in replies[-1].messages] == ["user", "user", "assistant"]  # image, text, answer
    # an image is a link to itself: a click opens it full size
    image = re.fullmatch(r"\[!\[image\]\((/gradio_api/file=.+\.png)\)\]\(\1\)", shown_text(replies[-1], 0))
    assert (
        image and Path(image[1].removeprefix(FILE)).parent == session.image_dir and shown_text(replies[-1], 1) == "look"
    )
    answer = shown_text(replies[-1])  # one message: text, the image inline, its label under it
    found = re.search(
        r"!\[Retrieved \(score -?[0-9.]+\)[^\]]*\]\(/gradio_api/file=(\S+\.png)\)\]\(\S+\)\n\n"
        r'<span class="image-label">\*\*Retrieved\*\*',
        answer,
    )
    assert found and Path(found[1]).is_file() and Path(found[1]).parent == session.image_dir
    summary = h.history(session)
    assert [t["role"] for t in summary["turns"]] == ["user", "assistant"]
    assert isinstance(summary["seeds"]["1"], int) and summary["settings"]["mode"] == "retrieve"


@pytest.mark.parametrize(
    "message, ui, needle",
    [
        ({"text": "   ", "files": []}, {}, "The message is empty"),
        ({"text": "hi", "files": []}, dict(seed="lucky"), "Seed must be a whole number or 'random', got 'lucky'."),
        ({"text": "hi", "files": [str(CAT)] * 9}, {}, "more than the limit of 8"),
        ({"text": "word " * 3000, "files": []}, dict(mode="text"), "fits 512"),
    ],
)
def test_refused_message_is_an_error_note_and_keeps_the_box(h, message, ui, needle):
    session = last(h.send(None, {"text": "hello", "files": []}, **TEXT)).session
    before = session.summary()["turns"]
    replies = list(h.send(session, message, **ui))
    reply = last(replies)
    assert not any(r.clear_box for r in replies), "the box keeps what was typed, to fix and send again"
    assert needle in error(reply) and len(reply.messages) == 2
    assert session.summary()["turns"] == before


def test_regenerate_takes_a_new_seed_even_when_one_is_set(h):
    session = last(h.send(None, {"text": "hi", "files": []}, seed="7", **TEXT)).session
    assert h.history(session)["seeds"] == {"1": 7}
    reply = last(h.regenerate(session, seed="7", **TEXT))
    assert len(session.chat.history) == 2 and h.history(session)["seeds"]["1"] != 7
    assert [m["role"] for m in reply.messages] == ["user", "assistant"]


def test_regenerate_before_any_answer(h):
    reply = last(h.regenerate(None))
    assert error(reply) == "Nothing to regenerate yet: send a message first." and reply.messages == []


def test_edit_branches_from_a_past_message_and_keeps_its_images(h):
    session = last(h.send(None, {"text": "first", "files": [str(CAT)]}, **TEXT)).session
    last(h.send(session, {"text": "second", "files": []}, **TEXT))
    reply = last(h.edit(session, 0, "a better first", **TEXT))
    turns = h.history(session)["turns"]
    assert len(turns) == 2 and turns[0]["segments"] == [
        {"image": "image", "source": "user"},
        {"text": "a better first"},
    ]
    assert [m["role"] for m in reply.messages] == ["user", "user", "assistant"]  # its image, its text, the answer
    # The chat's own editor names the shown message: message 1 is the text of turn 0 (message 0 is its image)
    assert session.turn_of_message(1) == (0, 1) and session.turn_of_message(0) is None
    last(h.edit_shown(session, 1, [{"type": "text", "text": "edited in the chat"}], **TEXT))
    assert user_texts(session) == ["edited in the chat"] and len(session.chat.history[0].images) == 1

    reply = last(h.edit(session, 1, "x"))  # an answer, not a user message
    assert "Turn 1 is not one of your messages (yours are turns [0])" in error(reply)
    assert len(session.chat.history) == 2


def test_refused_edit_puts_the_conversation_back(h):
    session = last(h.send(None, {"text": "first", "files": []}, **TEXT)).session
    last(h.send(session, {"text": "second", "files": []}, **TEXT))
    before = session.summary()["turns"]
    reply = last(h.edit(session, 0, "word " * 3000, **TEXT))
    assert "fits 512" in error(reply) and session.summary()["turns"] == before


def test_undo_and_clear(h):
    session = last(h.send(None, {"text": "one", "files": []}, **TEXT)).session
    last(h.send(session, {"text": "two", "files": []}, **TEXT))
    reply = h.undo(session)
    assert user_texts(reply.session) == ["one"] and len(reply.messages) == 2
    h.undo(session)
    assert error(h.undo(session)) == "Nothing to undo."

    last(h.send(session, {"text": "three", "files": []}, **TEXT))
    image_dir = session.image_dir
    reply = h.clear(session)
    assert reply.messages == [] and reply.clear_box and reply.session is not session
    assert h.history(reply.session)["turns"] == [] and not image_dir.exists()


def test_stop_mid_answer_keeps_what_streamed(h):
    session = h.new_session()
    turn = h.send(session, {"text": "talk", "files": []}, mode="text", max_new_tokens=200)
    for reply in turn:
        if reply.session.live and reply.session.live[0].strip():
            break
    assert h.stop(session) is session
    rest = list(turn)
    assert not rest[-1].running and h.history(session)["end_reasons"] == {"1": "stopped"}
    assert shown_text(rest[-1]).endswith("*(stopped)*") and len(session.chat.history[1].segments[0]) > 0


def test_a_message_sent_while_answering_is_queued_and_sent_next(h):
    session = h.new_session()
    turn = h.send(session, {"text": "long", "files": []}, mode="text", max_new_tokens=50)
    next(turn)  # the turn runs (and holds the session) until its generator ends
    queued = h.send(session, {"text": "me too", "files": []}, **TEXT)
    told = next(queued)
    assert "Queued: your message is sent when this answer ends" in told.notes[0].text and not told.clear_box
    assert "Still answering: press Stop first" in error(h.undo(session))
    assert "Still answering" in error(last(h.regenerate(session, **TEXT)))
    done = threading.Thread(target=lambda: list(turn))
    done.start()  # the first answer ends; the queued message goes next
    replies = list(queued)
    done.join(60)
    assert any(r.clear_box for r in replies) and user_texts(session) == ["long", "me too"]


def test_busy_message_says_how_many_are_ahead(h, monkeypatch):
    monkeypatch.setattr(handlers, "WAIT_POLL_S", 0.01)
    a, b = h.new_session(), h.new_session()
    first = h.send(a, {"text": "long", "files": []}, mode="text", max_new_tokens=50)
    next(first)  # a holds the model
    waiting = h.send(b, {"text": "me too", "files": []}, **TEXT)
    reply = next(waiting)
    assert "*Busy: 1 ahead of you.*" in shown_text(reply) and not reply.clear_box
    h.stop(b)  # withdrawn before the model started
    withdrawn = last(waiting)
    assert [n.text for n in withdrawn.notes] == ["Stopped before the model started; nothing was sent."]
    assert b.chat.history == []
    first.close()  # the page that sent it went away: the answer goes on, on the server
    assert a.running
    h.stop(a)
    list(h.live.follow(a))  # until it ends
    assert h.gate.busy == 0 and not a.running


def test_sessions_are_isolated(h):
    a = last(h.send(None, {"text": "I am A", "files": []}, **TEXT)).session
    b = last(h.send(None, {"text": "I am B", "files": []}, **TEXT)).session
    last(h.send(a, {"text": "still A", "files": []}, **TEXT))
    assert user_texts(a) == ["I am A", "still A"] and user_texts(b) == ["I am B"]


# ---------------------------------------------------------------------------------------------- the index


def test_switching_the_index_keeps_the_chat_and_its_caches(h):
    session = last(h.send(None, {"text": "look", "files": [str(CAT)]}, index="photos", **IMAGES)).session
    chat = session.chat
    photo = chat.history[0].images[0].key
    n_images, encoded = len(chat.vision_cache), chat.vision_cache.n_encoded
    assert chat.last_result is not None and photo in chat.vision_cache and session.index_name == "photos"
    first_turn = chat.last_result.n_prompt + len(chat.history[1].tokens or ())  # the positions turn 2 can reuse

    h.use_index(session, "astronaut only")
    assert session.chat is chat and session.index_name == "astronaut only"
    assert photo in chat.vision_cache and len(chat.vision_cache) == n_images
    assert chat.pipeline.index is h.pipelines["astronaut only"].index

    reply = last(h.send(session, {"text": "another", "files": []}, index="astronaut only", **IMAGES))
    assert "astronaut Eileen Collins" in shown_text(reply), "retrieved from the new index"
    assert chat.vision_cache.n_encoded == encoded, "the first turn's photo was not encoded again"
    # the KV of the conversation so far was kept (the engine's prefix cache): turn 2 prefilled only what is new
    assert chat.last_result is not None and chat.last_result.n_reused >= first_turn - 1
    assert len(chat.history) == 4

    h.use_index(session, "no such index")  # an unknown name changes nothing
    assert session.index_name == "astronaut only"


def test_each_session_starts_with_the_index_it_names(h):
    assert h.new_session("astronaut only").chat.pipeline.index is h.pipelines["astronaut only"].index
    assert h.new_session("no such index").index_name == "photos"  # the first one


def test_no_index_at_all(tiny_gill):
    assert tiny_gill.index is None
    bare = ChatHandlers(tiny_gill)
    assert bare.index_names == [] and list(bare.pipelines) == [controls.NO_INDEX]
    reply = last(bare.send(None, {"text": "show me", "files": []}, mode="retrieve", index=controls.NO_INDEX))
    assert "needs an image index" in error(reply)


# ---------------------------------------------------------------------------------------------- export / import


def test_export_json_loads_back_with_its_settings(h):
    session = last(h.send(None, {"text": "look", "files": [str(CAT)]}, **IMAGES)).session
    last(h.send(session, {"text": "more", "files": []}, seed="5", **TEXT))
    before = h.history(session)
    path = Path(h.export_json(session))
    data = json.loads(path.read_text())
    assert path.name == "conversation.json" and data["format"] == "fromage_gill.chat"
    answers = {str(i): t["seed"] for i, t in enumerate(data["turns"]) if t["role"] == "assistant"}
    assert answers == before["seeds"] and data["settings"]["mode"] == "text"  # each answer holds its seed

    reply = h.load_json(None, {"path": str(path)})
    after = h.history(reply.session)
    assert after["turns"] == before["turns"] and after["seeds"] == before["seeds"]
    assert reply.controls["mode"] == "text" and reply.controls["seed"] == "5" and "index" not in reply.controls
    assert [n.text for n in reply.notes] == ["Loaded a conversation of 2 exchanges from conversation.json."]
    last(h.send(reply.session, {"text": "and now?", "files": []}, **TEXT))
    assert len(reply.session.chat.history) == 6


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b'{"format": "fromage_gill.chat", "version": 1, "turns": [{"role": "robot", "segments": []}]}', "turns[0]"),
        (b'{"format": "fromage_gill.chat", "version": 1, "turns": [], "settings": {"temperature": "hot"}}', ""),
    ],
)
def test_nonsense_export_is_refused(h, tmp_path, content, needle):
    session = last(h.send(None, {"text": "hello", "files": []}, **TEXT)).session
    before = session.summary()["turns"]
    f = tmp_path / "edited.json"
    f.write_bytes(content)
    reply = h.load_json(session, str(f))
    assert reply.controls is None and session.summary()["turns"] == before
    assert error(reply).startswith("Could not load the conversation: ") and needle in error(reply)
    assert "No file" in error(h.load_json(session, None))


def test_export_html_is_self_contained(h):
    session = last(h.send(None, {"text": "look", "files": [str(CAT)]}, **IMAGES)).session
    page = Path(h.export_html(session)).read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<b>Retrieved</b> (score" in page and "look" in page


def test_close_session_removes_its_files(h):
    session = last(h.send(None, {"text": "look", "files": [str(CAT)]}, **TEXT)).session
    assert any(session.image_dir.iterdir())
    h.close_session(session)
    h.close_session(None)
    assert not session.image_dir.exists()
    assert h.view(None) == [] and h.history(None) == {"turns": [], "seeds": {}, "settings": {}}


def test_handlers_are_safe_from_two_threads(h):
    """Two tabs at once: each conversation gets only its own turns, through the one model gate."""
    sessions = [h.new_session() for _ in range(2)]

    def chat(session, name):
        for k in range(2):
            last(h.send(session, {"text": f"{name} {k}", "files": []}, **TEXT))

    threads = [threading.Thread(target=chat, args=(s, n)) for s, n in zip(sessions, "AB", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [user_texts(s) for s in sessions] == [["A 0", "A 1"], ["B 0", "B 1"]]
    assert h.gate.busy == 0


# ---------------------------------------------------------------------------------------------- settings, page, flags


def test_settings_from_the_controls(tiny_gill):
    base = controls.default_settings(tiny_gill, {"mode": "text"})
    assert base["max_new_tokens"] == 24 and base["num_inference_steps"] == 4 and base["mode"] == "text"
    s = controls.make_settings(base, {"max_new_tokens": 7.0, "seed": " 12 ", "index": "photos", "top_p": None})
    assert s.max_new_tokens == 7 and s.seed == 12 and s.mode == "text" and s.top_p == base["top_p"]
    assert controls.make_settings(base, {"seed": "Random"}).seed is None
    values = controls.control_values(s)
    assert values["seed"] == "12" and set(values) == {*controls.SETTING_KEYS, "seed"}
    assert controls.make_settings(base, values) == s
    with pytest.raises(ValueError, match="temperature"):
        controls.make_settings(base, {"temperature": -1.0})
    assert "magic" in controls.decoding_choices() and set(controls.SETTINGS_HELP) >= {"mode", "seed", "index"}
    # the published demos' answer cut and history layout (docs/fidelity.md) are app settings too
    published = controls.make_settings(base, {"answer_style": "published", "history_layout": "published"})
    assert published.answer_style == "published" and published.history_layout == "published"
    with pytest.raises(ValueError, match="answer_style"):
        controls.make_settings(base, {"answer_style": "short"})


def test_page_text(tiny_gill):
    header = header_markdown(tiny_gill, [])
    assert "`tiny-gill` — GILL" in header and "random weights" in header and "No image index" in header
    assert "No image index" not in header_markdown(tiny_gill, ["assets"])
    examples = example_messages(tiny_gill)
    assert len(examples) == 4 and all(Path(f).is_file() for e in examples for f in e["files"])


def test_serve_flags_parse():
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--model", "tiny-gill", "--index", "a=/x", "--index", "/y", "--max-queue", "3"])
    assert args.index == ["a=/x", "/y"] and args.max_queue == 3 and args.port == 7860


def test_load_indexes_names_them(tiny_gill):
    from fromage_gill.retrieve.index import shipped_index_dir

    shipped = shipped_index_dir("tiny-gill")
    got = load_indexes([f"mine={shipped}", str(shipped)], tiny_gill)
    assert list(got) == ["mine", "tiny-gill"] and all(len(i) == len(got["mine"]) for i in got.values())
    with pytest.raises(ValueError, match="max-queue"):
        AppOptions(max_queue=0)


def test_the_header_says_when_gill_runs_without_its_decision_head(tiny_gill):
    from types import SimpleNamespace

    from fromage_gill.chat.page import header_markdown

    assert "decision head" not in header_markdown(tiny_gill, [])
    # As load_pipeline(..., decision_model=False) builds it: the same GILL, no decision head.
    headless = SimpleNamespace(config=tiny_gill.config, index=None, model=SimpleNamespace(decision=None))
    assert "every image follows the Mode setting" in header_markdown(headless, [])


@pytest.mark.parametrize("value", [2.7, "abc", "3.5"])
def test_settings_refuse_values_that_are_not_whole_numbers(tiny_gill, value):
    from fromage_gill.chat.controls import make_settings

    with pytest.raises(ValueError, match=r"max_new_tokens must be a whole number"):
        make_settings({}, {"max_new_tokens": value})
    assert make_settings({}, {"max_new_tokens": 3.0}).max_new_tokens == 3


# ---------------------------------------------------------------------------------------------- settings that can work


def test_the_seed_shown_on_an_image_reproduces_it(h):
    draw = dict(mode="generate", image_logit_bias=20.0, max_images=1, max_new_tokens=6, num_inference_steps=2)
    first = last(h.send(None, {"text": "draw", "files": []}, seed="7", **draw))
    assert "**Generated** (seed 7)" in shown_text(first), "the shown seed is the Seed setting"
    assert h.history(first.session)["seeds"] == {"1": 7}
    again = last(h.send(None, {"text": "draw", "files": []}, seed="7", **draw))
    images = [s.session.chat.history[1].images[0].key for s in (first, again)]
    assert images[0] == images[1], "typing the shown seed makes the same image"


def test_settings_offer_only_what_can_work(h, tiny_gill):
    assert "magic" not in h.decodings and h.decodings == ["default", "contrastive"]  # no CLIP attached
    assert controls.default_settings(tiny_gill, {"decoding": "magic"})["decoding"] == "default"
    limit = h.max_new_tokens
    assert 400 < limit < 512  # the LM fits 512 positions; a short message and its image take the rest
    message = {"text": controls.SHORT_MESSAGE, "files": [str(CAT)]}
    ok = last(h.send(None, message, mode="text", max_new_tokens=limit, temperature=0.0))
    assert not ok.errors and len(ok.session.chat.history) == 2, "the largest value offered works"
    refused = last(h.send(None, message, mode="text", max_new_tokens=limit + 40))
    assert "fits 512" in error(refused)


# ---------------------------------------------------------------------------------------------- kept conversations


def test_a_conversation_outlives_a_reload_and_a_restart(tiny_gill, indexes, tmp_path):
    options = AppOptions(indexes=indexes, cache_dir=tmp_path)
    h = ChatHandlers(tiny_gill, options)
    session, kept = h.restore(None)  # a new browser: a new signed owner token for it to keep
    assert h.owners.verify(kept["owner"]) == session.owner and h.conversations(session) == []
    last(h.send(session, {"text": "first question", "files": [str(CAT)]}, seed="3", **TEXT))
    last(h.send(session, {"text": "second", "files": []}, **TEXT))
    before = h.history(session)

    reloaded, _ = h.restore(kept)  # the page is reloaded: a new tab session, the same conversation
    assert reloaded is not session and h.history(reloaded)["turns"] == before["turns"]
    restarted = ChatHandlers(tiny_gill, options)  # the app is restarted: only the disk is left
    assert restarted.browser_key == h.browser_key, "the browser's kept value stays readable"
    again, kept_again = restarted.restore(kept)
    assert kept_again == kept and h.history(again)["turns"] == before["turns"]
    assert h.history(again)["seeds"] == before["seeds"] and again.settings == session.settings
    assert [c.title for c in restarted.conversations(again)] == ["first question"]
    assert len(again.chat.history[0].images) == 1
    last(restarted.send(again, {"text": "third", "files": []}, **TEXT))
    assert len(again.chat.history) == 6

    assert restarted.restore({"owner": "../../etc"})[1]["owner"] != "../../etc"  # never a path


def test_a_turn_cut_short_by_a_crash_is_marked_interrupted(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    session, kept = h.restore(None)
    last(h.send(session, {"text": "hello", "files": []}, **TEXT))
    # The turn runs on in a server thread (live.py) whether or not its page reads it: the process "dies" once the
    # turn is stored as running, i.e. nothing it does after that reaches the disk.
    real_store, stored, gone = h._store, [], threading.Event()

    def store_then_die(s, *, running=False):
        if stored:
            gone.wait()  # this write never happens (until the test ends: then it is skipped)
            return None
        stored.append(running)
        return real_store(s, running=running)

    h._store = store_then_die
    turn = h.send(session, {"text": "tell me a long story", "files": []}, mode="text", max_new_tokens=200)
    while not next(turn).clear_box:  # the model took the message: it is stored as a running turn
        pass
    restarted = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    restored, _ = restarted.restore(kept)
    h_ = restarted.history(restored)
    assert [t["role"] for t in h_["turns"]] == ["user", "assistant"] * 2 and h_["end_reasons"]["3"] == "interrupted"
    assert "*(interrupted" in chatbot_messages(restored)[-1]["content"]
    assert user_texts(restored) == ["hello", "tell me a long story"]
    assert not restarted.store.load(restored.owner, restored.conversation)["running"], "stored as shown now"
    gone.set()
    turn.close()
    for _ in h.live.follow(session):  # the turn's thread ends before the test does
        pass


def test_new_chat_keeps_the_old_one_in_the_list_and_clear_deletes(h):
    session, kept = h.restore(None)
    last(h.send(session, {"text": "about cats", "files": []}, **TEXT))
    first = session.conversation
    fresh = h.new_chat(session)
    assert fresh.messages == [] and fresh.session.owner == session.owner and fresh.session.conversation != first
    last(h.send(fresh.session, {"text": "about rockets", "files": []}, **TEXT))
    assert [c.title for c in h.conversations(fresh.session)] == ["about rockets", "about cats"]
    back = h.open_conversation(fresh.session, first)
    assert user_texts(back.session) == ["about cats"] and back.session.conversation == first
    gone = h.clear(back.session)
    assert [c.title for c in h.conversations(gone.session)] == ["about rockets"]
    refused = h.open_conversation(gone.session, first)
    assert "no longer stored" in error(refused)


def test_exports_are_limited_and_removed_with_their_session(h, monkeypatch):
    session = last(h.send(None, {"text": "look", "files": [str(CAT)]}, **TEXT)).session
    path = Path(h.export_json(session))
    assert path.is_file() and path.parent == h.export_root / session.id
    assert Path(h.export_json(session)) == path, "a new export replaces the tab's previous one"
    for _ in range(h.options.max_exports):  # that many exports are being written
        h._exports.acquire()
    assert h.export_html(session) is None
    assert "2 exports are being written right now" in session.take_notes()[0].text
    for _ in range(h.options.max_exports):
        h._exports.release()
    h.close_session(session)
    assert not path.parent.exists() and not list(Path(tempfile.gettempdir()).glob(f"*{session.id}*"))


def test_an_imported_answer_without_text_is_no_blank_bubble_and_exchanges_are_counted(h, tmp_path):
    import dataclasses

    session = last(h.send(None, {"text": "hi", "files": []}, **TEXT)).session
    for k in range(2):
        last(h.send(session, {"text": f"more {k}", "files": []}, **TEXT))
    # an answer cut off before its first word (as an app that died mid-turn leaves it)
    history = session.chat.history
    history[-1] = dataclasses.replace(history[-1], segments=[], tokens=None)
    path = Path(h.export_json(session))
    reply = h.load_json(None, {"path": str(path)})
    assert [n.text for n in reply.notes] == ["Loaded a conversation of 3 exchanges from conversation.json."]
    answers = [m["content"] for m in reply.messages if m["role"] == "assistant"]
    assert len(answers) == 3 and answers[-1] == "*(no text: the answer ended before its first word)*"
    assert all(a.strip() for a in answers)


def test_the_loading_line_speaks_of_a_download_only_for_the_published_models(tmp_path):
    from fromage_gill.chat.options import loading_line

    assert "downloads" in loading_line("gill")
    for shipped in ("toy-gill", "tiny-gill", str(tmp_path)):
        assert "download" not in loading_line(shipped), shipped


def test_the_settings_table_takes_its_bounds_from_the_model_the_index_and_the_limits(h, indexes):
    from fromage_gill.generate.limits import MAX_IMAGES_PER_MESSAGE

    table = {c.key: c for c in h.settings_table}
    assert set(table) == {*controls.SETTING_KEYS, "seed", "index"}
    assert table["max_images"].bounds == (0, MAX_IMAGES_PER_MESSAGE)
    assert table["max_new_tokens"].bounds == (1, h.max_new_tokens) and h.max_new_tokens % controls.ROUND_TOKENS == 0
    smallest = min(len(i) for i in indexes.values())
    assert table["retrieval_candidates"].bounds[1] == max(2, min(controls.MAX_CANDIDATES, smallest))
    assert "magic" not in table["decoding"].help and "contrastive" in table["decoding"].help  # only what is offered
    for c in h.settings_table:
        value = controls.starting_value(c, h.defaults)
        if c.kind == "slider":
            assert c.bounds[0] <= value <= c.bounds[1], c.key
            assert isinstance(value, int) == (c.step == 1 and float(value).is_integer()), c.key
    words = " ".join(c.label + " " + c.help for c in h.settings_table).lower()
    assert "logit" not in words and "published" not in words
    kept = controls.kept_values(h.settings_table, {"temperature": 0.7, "max_images": 99, "mode": "nonsense"})
    assert kept == {"temperature": 0.7}, "a kept value outside this model's ranges is left out"
