"""The OpenAI-compatible API over the batching engine (``EngineBackend``), through the unchanged ``openai`` client on
tiny-gill: concurrent conversations decode together and each answers as a stateful Chat does, turn 2 served from the
prefix cache; images come back streamed and not."""

from __future__ import annotations

import threading

import openai
import pytest
from test_serve_api import DRAW, KEY, Server, check_image, create, user

from fromage_gill.chat.options import load_indexes
from fromage_gill.generate.chat import Chat
from fromage_gill.retrieve.fetch import FetchConfig
from fromage_gill.serve.api import build_app
from fromage_gill.serve.engine_backend import EngineBackend
from fromage_gill.settings import GenerationSettings


@pytest.fixture(scope="module")
def served(tiny_gill):
    backend = EngineBackend(tiny_gill, indexes=load_indexes(None, tiny_gill), fetch=FetchConfig(), max_batch=8)
    server = Server(build_app(backend, api_key=KEY))
    yield server, backend
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url, api_key=KEY, max_retries=0, timeout=60)


def test_concurrent_conversations_decode_together_and_answer_as_chats_do(served, client, tiny_gill, images):
    _, backend = served
    n = 6
    answers: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def conversation(i: int) -> None:
        try:
            start.wait()
            first = user(f"What is in picture {i}?", images[i % len(images)])
            a1 = create(client, [first], seed=i, max_tokens=8).choices[0].message.content
            second = [first, {"role": "assistant", "content": a1}, user("And then?")]
            a2 = create(client, second, seed=i, max_tokens=8).choices[0].message.content
            answers[i] = [a1, a2]
        except BaseException as e:  # noqa: BLE001 -- raised in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert backend.engine.stats().largest_batch >= 2  # they did share forwards
    assert backend.engine.prefix_cache.stats().hits >= n  # every turn 2 found its turn 1 cached
    base = GenerationSettings.for_model(tiny_gill.config, max_new_tokens=8, temperature=0.0)
    for i in range(n):
        chat = Chat(tiny_gill)
        s = GenerationSettings(**{**base.__dict__, "seed": i})
        list(chat.send([f"What is in picture {i}?", images[i % len(images)]], s))
        list(chat.send(["And then?"], s))
        assert [t.text for t in chat.history if t.role == "assistant"] == answers[i]


def test_a_generated_image_comes_back_streamed_and_not(served, client):
    server, _ = served
    whole = create(client, [user("Draw a cat")], seed=2, **DRAW).choices[0].message
    (entry,) = whole.model_extra["images"]
    check_image(entry, "generated", server)
    chunks = list(create(client, [user("Draw a cat")], stream=True, seed=2, **DRAW))
    streamed = [e for c in chunks for e in (c.choices[0].delta.model_extra or {}).get("images", [])]
    assert len(streamed) == 1 and check_image(streamed[0], "generated", server) == check_image(
        entry, "generated", server
    )
