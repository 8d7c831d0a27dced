"""The OpenAI-compatible API (``fromage_gill.serve``) through the unchanged ``openai`` client, on a server started on
127.0.0.1 in a thread (tiny-gill): conversations with images in and out, streamed and not, every refusal with its
status and message, lmms-eval's request shape, and the queue's 429 / 503."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from fromage_gill.chat.options import load_indexes
from fromage_gill.generate.chat import Chat
from fromage_gill.retrieve.fetch import FetchConfig
from fromage_gill.serve.api import REPLICA_HEADER, build_app
from fromage_gill.serve.backend import ThreadedChatBackend
from fromage_gill.settings import GenerationSettings

KEY = "test-key"
IMAGES = dict(image_logit_bias=20.0, max_images=1)  # the random tiny model shows an image at once
DRAW = dict(mode="generate", steps=2, **IMAGES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server on 127.0.0.1 in a thread; ``stop()`` ends it."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API server did not start within 30 s"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def user(text: str, *images: Image.Image) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}]
        + [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images],
    }


@pytest.fixture(scope="module")
def server(tiny_gill):
    backend = ThreadedChatBackend(tiny_gill, indexes=load_indexes(None, tiny_gill), fetch=FetchConfig())
    s = Server(build_app(backend, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def create(client, messages, **extra):
    std = {k: extra.pop(k) for k in ("max_tokens", "temperature", "seed", "stop", "stream", "top_p") if k in extra}
    std.setdefault("max_tokens", 6)
    std.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny-gill", messages=messages, extra_body=extra or None, **std)


def test_models_lists_the_model_and_its_indexes(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-gill"]
    assert models[0].model_extra["fromage_gill"] == {"kind": "gill", "indexes": ["assets"]}


def test_a_stateless_conversation_with_images_matches_a_chat_turn_for_turn(client, tiny_gill, images):
    """Turn 2 sent with turn 1's answer as the client got it decodes the very tokens a stateful Chat decodes."""
    first = user("What is in this picture?", images[0])
    r1 = create(client, [first], seed=3)
    a1 = r1.choices[0].message
    assert isinstance(a1.content, str) and a1.content and r1.usage.completion_tokens == 6
    second = user("And this one?", images[1])
    r2 = create(client, [first, {"role": "assistant", "content": a1.content}, second], seed=4)

    chat = Chat(tiny_gill)
    settings = GenerationSettings.for_model(tiny_gill.config, max_new_tokens=6, temperature=0.0)
    list(chat.send(["What is in this picture?", images[0]], GenerationSettings(**{**settings.__dict__, "seed": 3})))
    list(chat.send(["And this one?", images[1]], GenerationSettings(**{**settings.__dict__, "seed": 4})))
    assert [t.text for t in chat.history if t.role == "assistant"] == [a1.content, r2.choices[0].message.content]
    # the whole history was in turn 2's prompt: turn 1's prompt and answer, and the new image's visual tokens
    n_visual = tiny_gill.config.n_visual_tokens
    assert r2.usage.prompt_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens + n_visual


def check_image(entry: dict, source: str, server) -> bytes:
    url = entry["image_url"]["url"]
    assert entry["type"] == "image_url" and url.startswith("data:image/png;base64,")
    data = base64.b64decode(url.split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).format == "PNG"
    ext = entry["fromage_gill"]
    assert ext["source"] == source
    p_gen, p_ret = ext["decision"]["p_generate"], ext["decision"]["p_retrieve"]
    assert p_gen + p_ret == pytest.approx(1.0, abs=1e-5)
    served = httpx.get(ext["file"], timeout=10)  # the markdown link's file: the same PNG, no key needed
    assert served.status_code == 200 and served.content == data
    return data


def test_a_generated_image_comes_back_as_a_link_in_content_and_in_images(client, server):
    r = create(client, [user("Draw a cat")], **DRAW)
    msg = r.choices[0].message
    (entry,) = msg.model_extra["images"]
    check_image(entry, "generated", server)
    assert f"]({entry['fromage_gill']['file']})" in msg.content
    assert entry["fromage_gill"]["caption"] is None


def test_a_retrieved_image_comes_back_with_its_caption(client, server):
    r = create(client, [user("Show me a photo")], mode="retrieve", **IMAGES)
    (entry,) = r.choices[0].message.model_extra["images"]
    check_image(entry, "retrieved", server)
    assert entry["fromage_gill"]["caption"] and entry["fromage_gill"]["caption"] in r.choices[0].message.content


@pytest.mark.parametrize("mode", ["generate", "retrieve"])
def test_streamed_answers_carry_the_same_images_and_end_with_done(client, server, mode):
    extra = DRAW if mode == "generate" else dict(mode="retrieve", **IMAGES)
    chunks = list(create(client, [user("Show me")], stream=True, seed=5, **extra))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    entries = [e for c in chunks for e in (c.choices[0].delta.model_extra or {}).get("images", [])]
    assert len(entries) == 1
    check_image(entries[0], "generated" if mode == "generate" else "retrieved", server)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    whole = create(client, [user("Show me")], seed=5, **extra).choices[0].message

    def same_files(text: str) -> str:  # each answer's image has its own file
        return re.sub(r"/v1/files/[0-9a-f]{32}\.png", "/v1/files/ID.png", text)

    assert same_files(content) == same_files(whole.content)


def test_each_response_names_the_replica_that_served_it(server):
    r = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": "tiny-gill", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers[REPLICA_HEADER] == r.json()["fromage_gill"]["replica"] != "unknown"


def test_an_lmms_eval_openai_compatible_request_reads_a_string_answer(server, images):
    """The payload lmms-eval's ``openai_compatible`` model builds (text, then PNG data URLs; max_tokens,
    temperature) and how it reads the answer: ``response.choices[0].message.content``."""
    lmms_client = openai.OpenAI(api_key=KEY, base_url=server.url.rstrip("/"))
    payload = {
        "model": "tiny-gill",
        "messages": [{"role": "user", "content": []}],
        "max_tokens": 8,
        "temperature": 0,
    }
    payload["messages"][0]["content"].append({"type": "text", "text": "Describe the image."})
    for img in images[:2]:
        b64 = base64.b64encode(png(img)).decode("utf-8")
        payload["messages"][0]["content"].append(
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}
        )
    text = lmms_client.chat.completions.create(**payload).choices[0].message.content
    assert isinstance(text, str) and len(text) > 0


# ---------------------------------------------------------------------------------------------- refusals


def _refused(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


BAD = {
    "not an image": (
        lambda c: create(
            c,
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                }
            ],
        ),
        "messages[0].content[0].image_url: not a readable image",
    ),
    "bad base64": (
        lambda c: create(
            c, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]
        ),
        "not valid base64",
    ),
    "ftp URL": (
        lambda c: create(
            c, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]
        ),
        "must be a data URL",
    ),
    "loopback URL": (
        lambda c: create(
            c, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]
        ),
        "127.0.0.1",
    ),
    "too many images": (
        lambda c: create(c, [user("look", *[Image.new("RGB", (8, 8))] * 9)]),
        "holds 9 images, more than the limit of 8 per message",
    ),
    "unknown model": (
        lambda c: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
        "model 'gpt-4o' is not served here; this server serves 'tiny-gill'",
    ),
    "bad temperature": (lambda c: create(c, [user("hi")], temperature=-1), "temperature=-1"),
    "bad max_tokens": (lambda c: create(c, [user("hi")], max_tokens=0), "max_tokens: max_new_tokens=0"),
    "bad mode": (lambda c: create(c, [user("hi")], mode="paint"), "mode"),
    "unknown setting": (lambda c: create(c, [user("hi")], ret_scale=2), "unknown field 'ret_scale'"),
    "too long": (lambda c: create(c, [user("word " * 3000)]), "but the LM fits"),
    "answer first": (
        lambda c: create(c, [{"role": "assistant", "content": "hi"}]),
        "messages[0] is a assistant message",
    ),
    "empty message": (lambda c: create(c, [{"role": "user", "content": ""}]), "empty"),
    "n=2": (lambda c: c.chat.completions.create(model="tiny-gill", messages=[user("hi")], n=2), "n"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_request_gets_400_naming_the_problem(client, case):
    call, message = BAD[case]
    e = _refused(lambda: call(client))
    assert e.status_code == 400, e.response.text
    body = e.response.json()["error"]
    assert message in body["message"]
    assert body["type"] == "invalid_request_error" and set(body) == {"message", "type", "param", "code"}


def test_a_missing_or_wrong_key_gets_401(server):
    for key in ("wrong", None):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{server.url}/models", headers=headers, timeout=10)
        assert r.status_code == 401
        assert "--api-key" in r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_api_key"
    e = _refused(lambda: openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list())
    assert e.status_code == 401


def test_a_body_over_the_limit_gets_413_before_it_is_read(tiny_gill, images):
    s = Server(build_app(ThreadedChatBackend(tiny_gill), max_request_bytes=1000))
    try:
        client = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0)
        e = _refused(lambda: create(client, [user("hi", images[3])]))
        assert e.status_code == 413 and "more than 1,000 bytes" in e.response.json()["error"]["message"]
    finally:
        s.stop()


class HeldBackend(ThreadedChatBackend):
    """Each turn waits for ``release`` before decoding: the queue fills deterministically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def _run(self, *args):
        self.release.wait(30)
        return super()._run(*args)


class Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- the stdlib's name
        body = png(Image.new("RGB", (32, 32), (200, 30, 30)))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_over_capacity_requests_get_429_then_503_and_the_queue_recovers(tiny_gill):
    backend = HeldBackend(
        tiny_gill, concurrency=1, max_queue=1, queue_timeout_s=4.0, fetch=FetchConfig(allow_private=True)
    )
    s = Server(build_app(backend))
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=60)
        running = threading.Thread(target=functools.partial(create, client, [user("one")]), daemon=True)
        running.start()
        deadline = time.monotonic() + 10
        while backend.load().running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting: dict = {}

        def wait_in_queue():
            try:
                create(client, [user("two")])
            except openai.APIStatusError as e:
                waiting["error"] = e

        queued = threading.Thread(target=wait_in_queue, daemon=True)
        queued.start()
        while backend.load().waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        full = _refused(lambda: create(client, [user("three")]))
        assert full.status_code == 429 and "the queue is full" in full.response.json()["error"]["message"]
        assert full.response.headers["retry-after"] == "1"
        queued.join(10)
        assert waiting["error"].status_code == 503 and "waited 4 s in the queue" in waiting["error"].message
        backend.release.set()
        running.join(30)
        # the places are free again, and an http image is fetched under the policy (loopback allowed here)
        url = f"http://127.0.0.1:{images.server_address[1]}/red.png"
        r = create(
            client,
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}],
                }
            ],
        )
        assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens > 0
        while backend.load() != type(backend.load())(0, 0, 2):  # the worker gives its place back as it ends
            assert time.monotonic() < deadline + 60, backend.load()
            time.sleep(0.02)
    finally:
        backend.release.set()
        images.shutdown()
        s.stop()


def test_the_chat_app_serves_the_same_api_from_its_own_server(tiny_gill):
    """``python app.py --api``: gradio's launch() with ``gradio_app_kwargs`` answers /v1 beside the app."""
    import gradio as gr

    from fromage_gill.chat.options import AppOptions
    from fromage_gill.serve.api import gradio_app_kwargs

    with gr.Blocks() as demo:
        gr.Markdown("chat")
    port = free_port()
    kwargs = gradio_app_kwargs(tiny_gill, AppOptions(), api_key=KEY)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, app_kwargs=kwargs, quiet=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-gill"]
        assert isinstance(create(client, [user("hi")]).choices[0].message.content, str)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200  # the app is still there
    finally:
        demo.close()


def test_gpu_checks_serving_sweep_runs_tiny_on_the_cpu():
    """``gpu_check.py --serving`` (the full-size sweep for a lent GPU) runs the same code on tiny-gill, so it cannot
    rot: every sweep point answered, with tokens counted."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_for_serving", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = ["--tiny", "--only", "bf16", "--new-tokens", "2", "--repeats", "1", "--steps", "1", "--turns", "2"]
    serving = gpu_check.main([*args, "--serving"])["serving"]
    assert [p["clients"] for p in serving["sweep"]] == [1, 2]
    assert all(p["errors"] == [] and p["completion_tokens"] > 0 for p in serving["sweep"])
    assert serving["long"]["turns"] == 2 and serving["abuse"]["statuses"] == ["200"]


@pytest.mark.parametrize("backend", ["threaded", "engine"])
def test_a_text_turn_does_not_wait_behind_other_requests_image_decoding(tiny_gill, images, monkeypatch, backend):
    from fromage_gill.serve.backend import ImageInput
    from fromage_gill.serve.engine_backend import EngineBackend

    decoding, release = threading.Event(), threading.Event()
    load = ImageInput.load

    def slow_load(self, fetcher):
        decoding.set()
        release.wait(30)
        return load(self, fetcher)

    monkeypatch.setattr(ImageInput, "load", slow_load)
    # the engine's: more requests stuck decoding than asyncio's shared thread pool has threads (6 on 2 cores)
    served, n_heavy = (
        (ThreadedChatBackend(tiny_gill, concurrency=1), 1) if backend == "threaded" else (EngineBackend(tiny_gill), 8)
    )
    s = Server(build_app(served))
    try:
        client = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=60)
        heavy = [
            threading.Thread(target=create, args=(client, [user("look", images[0])]), daemon=True)
            for _ in range(n_heavy)
        ]
        for t in heavy:
            t.start()
        assert decoding.wait(10)
        time.sleep(0.5)  # every heavy request is in by now, waiting behind the first picture
        t0 = time.monotonic()
        assert isinstance(create(client, [user("just text")]).choices[0].message.content, str)
        assert all(t.is_alive() for t in heavy) and time.monotonic() - t0 < 20  # answered while they wait
        release.set()
        for t in heavy:
            t.join(30)
        assert not any(t.is_alive() for t in heavy)
    finally:
        release.set()
        s.stop()


def test_an_answer_sent_back_edited_keeps_its_image_links_as_images(tiny_gill, images):
    """Without the exact turn (the content was edited), an answer's links to the server's files become image
    segments again: a retrieved one with its index id (so it is not shown twice), an unknown one as generated."""
    from fromage_gill.generate.prompt import ImageSegment
    from fromage_gill.serve.convert import to_chat_request
    from fromage_gill.serve.files import AnswerMemo, FileStore
    from fromage_gill.serve.schemas import ChatCompletionRequest

    store = FileStore()
    known, _ = store.put(ImageSegment(images[0], "retrieved", caption="a cat", index_id=5))
    content = f"Edited. ![image 1](http://h/v1/files/{known}.png) and ![x](http://h/v1/files/{'0' * 32}.png) end"
    req = ChatCompletionRequest(
        model="tiny-gill",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "show me"},
            {"role": "assistant", "content": content},
            {"role": "user", "content": "more"},
        ],
    )
    out = to_chat_request(req, tiny_gill.config, memo=AnswerMemo(), store=store, fetch_urls=False)
    assert [m.role for m in out.messages] == ["user", "assistant", "user"]
    assert out.messages[0].parts == ("Be brief.\n", "show me")
    parts = out.messages[1].parts
    assert parts[0] == "Edited. " and parts[2] == " and " and parts[4] == " end" and out.messages[1].tokens is None
    assert (parts[1].source, parts[1].index_id, parts[1].caption) == ("retrieved", 5, "a cat")
    assert (parts[3].source, parts[3].index_id) == ("generated", None)


def test_app_py_api_flag_hands_gradio_the_v1_mount(monkeypatch):
    """``python app.py --api``: serve() passes launch() the /v1 mount (without the flag: nothing)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import app

    launched: list[dict] = []

    class Demo:  # stands in for the Blocks: records what launch() got
        def launch(self, **kwargs):
            launched.append(kwargs)

    monkeypatch.setattr(app, "build_demo", lambda pipeline, options, **kw: Demo())
    assert app.main(["--model", "tiny-gill", "--port", "7998", "--api"]) == 0
    assert app.main(["--model", "tiny-gill", "--port", "7998"]) == 0
    (mount,) = launched[0]["app_kwargs"]["routes"]
    assert mount.path == "/v1" and launched[1]["app_kwargs"] is None
