"""A turn's facts live on the turn: each answer's seed and end reason (and each image's decision) are fields of the
engine's assistant ``Turn``, so they survive undo, regenerate, export and import with no side dictionaries; older
files (a top-level "seeds" object, decisions as pairs, a stored record's "reasons") are still read."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fromage_gill.chat.handlers import ChatHandlers
from fromage_gill.chat.options import AppOptions
from fromage_gill.chat.records import record_chat
from fromage_gill.chat.session import ChatSession
from fromage_gill.generate import Chat, GenerationSettings, TurnEnd
from fromage_gill.generate.history import history_from_dict, history_to_dict
from fromage_gill.generate.prompt import Decision, ImageSegment, Turn

TEXT = dict(mode="text", max_new_tokens=4)


def answer_facts(chat: Chat) -> list[tuple[int | None, str | None]]:
    return [(t.seed, t.end_reason) for t in chat.history if t.role == "assistant"]


def test_each_answer_holds_its_seed_and_end_reason(tiny_gill):
    chat = Chat(tiny_gill)
    events = list(chat.send(["hello"], GenerationSettings(max_new_tokens=3, mode="text", seed=7, stop_at_eos=False)))
    end = events[-1]
    assert isinstance(end, TurnEnd) and (end.seed, end.reason) == (7, "max_new_tokens")
    assert answer_facts(chat) == [(7, "max_new_tokens")], "the TurnEnd's facts are on the answer"
    list(chat.send(["again"], GenerationSettings(max_new_tokens=2, mode="text", seed=9, stop_at_eos=False)))
    assert answer_facts(chat) == [(7, "max_new_tokens"), (9, "max_new_tokens")]

    chat.undo()  # the second exchange goes, with its facts: no stale entry is left to filter out
    assert answer_facts(chat) == [(7, "max_new_tokens")]
    list(chat.regenerate(GenerationSettings(max_new_tokens=2, mode="text", stop_at_eos=False)))
    [(seed, reason)] = answer_facts(chat)
    assert seed is not None and seed != 7 and reason == "max_new_tokens", "regenerate draws a new seed"

    back = Chat.from_dict(tiny_gill, json.loads(json.dumps(chat.to_dict())))
    assert answer_facts(back) == [(seed, reason)], "export and import keep them"


def test_a_stopped_answer_says_so(tiny_gill):
    chat = Chat(tiny_gill)
    events = chat.send(["tell me a story"], GenerationSettings(max_new_tokens=50, mode="text", seed=3))
    next(events)
    chat.stop()
    assert [e for e in events if isinstance(e, TurnEnd)][-1].reason == "stopped"
    assert answer_facts(chat) == [(3, "stopped")]


def test_facts_survive_undo_regenerate_export_and_import_in_the_app(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    session = list(h.send(None, {"text": "first", "files": []}, seed="7", **TEXT))[-1].session
    list(h.send(session, {"text": "second", "files": []}, seed="8", **TEXT))
    assert h.history(session)["seeds"] == {"1": 7, "3": 8}
    assert not hasattr(session, "seeds") and not hasattr(session, "reasons"), "no side dictionaries"

    h.undo(session)
    assert h.history(session)["seeds"] == {"1": 7} and set(h.history(session)["end_reasons"]) == {"1"}
    list(h.regenerate(session, **TEXT))  # regenerate always draws a new seed
    summary = h.history(session)
    assert set(summary["seeds"]) == {"1"} and summary["seeds"]["1"] != 7
    assert summary["end_reasons"]["1"] == session.chat.history[1].end_reason is not None

    loaded = h.load_json(None, {"path": h.export_json(session)}).session
    assert h.history(loaded)["seeds"] == summary["seeds"]
    assert h.history(loaded)["end_reasons"] == summary["end_reasons"]


def saved_turns(decision: object) -> list[dict]:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    image = {"type": "image", "png": base64.b64encode(buf.getvalue()).decode(), "source": "retrieved"}
    return [
        {"role": "user", "segments": [{"type": "text", "text": "show me"}]},
        {"role": "assistant", "segments": [{"type": "text", "text": "here"}, {**image, "decision": decision}]},
    ]


def test_decisions_are_saved_as_named_probabilities_and_old_pairs_still_read():
    turn = Turn("assistant", ["x", ImageSegment(Image.new("RGB", (4, 4)), "retrieved", decision=Decision(0.2, 0.8))])
    saved = history_to_dict([Turn("user", ["q"]), turn], model="m")
    assert saved["turns"][1]["segments"][1]["decision"] == {"p_generate": 0.2, "p_retrieve": 0.8}
    for shape in ({"p_generate": 0.25, "p_retrieve": 0.75}, [0.25, 0.75]):
        data = {"format": "fromage_gill.chat", "version": 1, "model": "m", "turns": saved_turns(shape)}
        assert history_from_dict(data, model="m", vocab_size=10)[1].images[0].decision == Decision(0.25, 0.75)
    bad = {"format": "fromage_gill.chat", "version": 1, "turns": saved_turns({"p_generate": 0.5})}
    with pytest.raises(ValueError, match="p_retrieve"):
        history_from_dict(bad, model="m", vocab_size=10)


def test_an_older_export_keeps_its_seeds_and_a_stored_record_its_end_reasons():
    old = {"format": "fromage_gill.chat", "version": 1, "turns": saved_turns(None), "seeds": {"1": 42}}
    assert history_from_dict(old, model="m", vocab_size=10)[1].seed == 42
    with pytest.raises(ValueError, match="'seeds' must map turn numbers"):
        history_from_dict({**old, "seeds": {"x": 1}}, model="m", vocab_size=10)
    record = {"chat": old, "reasons": {"1": "eos"}}
    data = record_chat(record)
    assert history_from_dict(data, model="m", vocab_size=10)[1].end_reason == "eos"


def test_the_session_folds_no_turn_facts(tiny_gill, tmp_path):
    session = ChatSession(Chat(tiny_gill), image_dir=tmp_path)
    session.apply(TurnEnd("eos", 5))  # the engine put the facts on the answer; nothing is stashed here
    assert session.live == [] and session.summary()["seeds"] == {}
