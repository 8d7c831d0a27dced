"""The app's sessions decode on one shared ``Engine`` (chat/handlers.py): visitors' turns share forwards instead of
queueing turn by turn, each answer is the one it gets alone, and a contrastive turn (which the batch cannot decode)
runs as a plain ``Chat``'s turn of the same conversation."""

from __future__ import annotations

import threading

import pytest

from fromage_gill.chat.handlers import ChatHandlers
from fromage_gill.chat.options import AppOptions
from fromage_gill.generate import Chat, GenerationSettings
from fromage_gill.generate.engine_chat import EngineChat

GREEDY = dict(mode="text", max_new_tokens=12, temperature=0.0)


@pytest.fixture
def h(tiny_gill, tmp_path):
    handlers = ChatHandlers(tiny_gill, AppOptions(concurrency=4, cache_dir=tmp_path))
    yield handlers
    handlers.close_engine()


def answer(h: ChatHandlers, session, text: str, **ui) -> list:
    for _ in h.send(session, {"text": text, "files": []}, **ui):
        pass
    assert not [n for n in session.notes if n.kind == "error"], session.notes
    return list(session.chat.history[-1].tokens)


def test_sessions_turns_decode_together_on_one_engine(h):
    questions = ["hello there", "a cat on a mat", "what is this?", "tell me more"]
    alone = [answer(h, h.new_session(), q, **GREEDY) for q in questions]
    assert h.engine.stats().largest_batch == 1
    sessions = [h.new_session() for _ in questions]
    assert all(isinstance(s.chat, EngineChat) and s.chat.engine is h.engine for s in sessions)
    together: list = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def run(i: int) -> None:
        start.wait()
        together[i] = answer(h, sessions[i], questions[i], **GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone  # greedy fp32: batch mates change no token
    assert h.engine.stats().largest_batch >= 2, "the visitors' turns shared decode steps"


def test_a_second_turn_finds_its_first_in_the_prefix_cache(h):
    s = h.new_session()
    answer(h, s, "hello there", **GREEDY)
    answer(h, s, "and again", **GREEDY)
    r = s.chat.last_result
    assert r is not None and r.n_reused > 0 and r.n_reused < r.n_prompt


def test_a_contrastive_turn_runs_as_a_plain_chats_turn_of_the_same_conversation(h, tiny_gill):
    if "contrastive" not in h.decodings:
        pytest.skip("tiny-gill offers no contrastive decoding")
    s = h.new_session()
    answer(h, s, "hello there", **GREEDY)
    tokens = answer(h, s, "and again", **GREEDY, decoding="contrastive")
    plain = Chat(tiny_gill)
    plain.history = list(s.chat.history[:-2])
    settings = GenerationSettings(mode="text", max_new_tokens=12, temperature=0.0, decoding="contrastive")
    for _ in plain.send(["and again"], settings):
        pass
    assert tokens == list(plain.history[-1].tokens)
    assert s.chat._cache is None  # the plain turn's KV went with it
    answer(h, s, "back to default", **GREEDY)  # and the conversation goes on in the batch
    assert len(s.chat.history) == 6
