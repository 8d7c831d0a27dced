"""The batching engine on tiny-gill (fp32, CPU): a request's tokens and images do not depend on its batch mates; the
prefix cache serves a follow-up turn's history; the LRU is bounded in bytes; image decoding waits or is refused past
its budget; EngineChat and EngineBackend give what Chat and the ChatBackend protocol promise."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time

import numpy as np
import pytest
import torch

from fromage_gill.generate import Chat, GenerationSettings, ImageResult, TextDelta, Turn, TurnEnd
from fromage_gill.generate.capacity import DECODE_BYTES_PER_PIXEL, ImageBudget, OverCapacity
from fromage_gill.generate.engine import Engine
from fromage_gill.generate.engine_chat import EngineChat
from fromage_gill.generate.prefix_cache import PrefixCache, kv_bytes
from fromage_gill.generate.prompt import dialogue_pieces, encode_pieces, normalize_message
from fromage_gill.generate.resolve import ImageResolver
from fromage_gill.images import ImageError
from fromage_gill.retrieve import ImageIndex
from fromage_gill.serve.engine_backend import EngineBackend

TEXT = dict(stop_at_eos=False, stop_strings=())
FORCED = dict(TEXT, image_logit_bias=float("inf"), max_images=1, num_inference_steps=2, seed=7)


def encode(pipe, turns):
    pieces = dialogue_pieces(turns, pipe.config.dialogue, pipe.model.image_token_ids)
    return encode_pieces(pipe.tokenizer, pieces, pipe.config.n_visual_tokens)


def user(message):
    return Turn("user", normalize_message(message))


def drain(engine, requests, limit_s: float = 60):
    """Run a ``start=False`` engine until every request has finished; each request's events."""
    deadline = time.monotonic() + limit_s
    while not all(r.result for r in requests):
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        engine.run_step(timeout=1)
    return [list(r.events()) for r in requests]


def images_of(events):
    return [e for e in events if isinstance(e, ImageResult)]


@pytest.fixture(scope="module")
def gill(tiny_gill, tmp_path_factory):
    """tiny-gill with an index over four pictures (retrieval) and its Stable Diffusion (generation)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pics = [
        Image.fromarray((torch.rand(48 + 8 * i, 40 + 4 * i, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
        for i in range(4)
    ]
    m, folder = tiny_gill.model, tmp_path_factory.mktemp("index")
    with torch.no_grad():
        emb = m.image_embedding(m.encode_images(m.vision.processor(pics)))
    records = []
    for i, pic in enumerate(pics):
        pic.save(folder / f"{i}.png")
        records.append({"path": str(folder / f"{i}.png"), "url": None, "caption": f"picture {i}"})
    pipe = dataclasses.replace(tiny_gill, index=ImageIndex.from_embeddings(emb, records, m.retrieval_fingerprint()))
    pipe.pictures = pics
    return pipe


def requests_mix(pipe):
    """Four turns: long text, a generated image after 2 words, a retrieved one after 4, a short text."""
    return [
        ([user(["tell me a story"])], GenerationSettings(max_new_tokens=14, mode="text", **TEXT)),
        (
            [user(["draw a cat", pipe.pictures[0]])],
            GenerationSettings(max_new_tokens=8, mode="generate", min_word_tokens=2, **FORCED),
        ),  # noqa: E501
        ([user(["show me a dog"])], GenerationSettings(max_new_tokens=8, mode="retrieve", min_word_tokens=4, **FORCED)),  # noqa: E501
        ([user(["hi"])], GenerationSettings(max_new_tokens=3, mode="text", **TEXT)),
    ]


# ---------------------------------------------------------------------------------------------- batching parity


def test_tokens_and_images_are_the_same_alone_or_joining_and_leaving_a_batch(gill):
    mix = requests_mix(gill)
    solo = []
    for turns, s in mix:
        with Engine(gill, start=False) as engine:
            r = engine.submit(encode(gill, turns), s)
            solo.append((r, drain(engine, [r])[0]))

    with Engine(gill, start=False) as engine:
        reqs = [engine.submit(encode(gill, t), s) for t, s in mix[:2]]
        engine.run_step()
        engine.run_step()  # the first two are two tokens in when the third joins
        reqs.append(engine.submit(encode(gill, mix[2][0]), mix[2][1]))
        engine.run_step()
        engine.run_step()
        reqs.append(engine.submit(encode(gill, mix[3][0]), mix[3][1]))  # joins mid-answer, leaves first
        events = drain(engine, reqs)
        assert engine.stats().largest_batch >= 3

    for (alone, alone_events), batched, batched_events in zip(solo, reqs, events, strict=True):
        assert batched.result.tokens == alone.result.tokens
        assert batched.result.text == alone.result.text
        assert [type(e) for e in batched_events] == [type(e) for e in alone_events]
        for a, b in zip(images_of(alone_events), images_of(batched_events), strict=True):
            assert (a.source, a.index_id, a.seed) == (b.source, b.index_id, b.seed)
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    kinds = [[i.source for i in images_of(ev)] for ev in events]
    assert kinds == [[], ["generated"], ["retrieved"], []]
    # the engine's turn is the Chat's turn
    for (turns, s), (alone, _) in zip(mix, solo, strict=True):
        chat = Chat(gill)
        list(chat.send(turns[-1].segments, s))
        assert list(chat.history[-1].tokens) == alone.result.tokens


def test_text_rows_finish_while_another_rows_image_is_being_made(gill, monkeypatch):
    release = threading.Event()
    resolve = ImageResolver.resolve

    def slow(self, *args, **kwargs):  # the image takes as long as the test says
        assert release.wait(30), "the test never released the image"
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(ImageResolver, "resolve", slow)
    show = GenerationSettings(max_new_tokens=6, mode="retrieve", min_word_tokens=1, **FORCED)
    with Engine(gill, start=False) as engine:
        pic = engine.submit(encode(gill, [user(["show me a dog"])]), show)
        story = GenerationSettings(max_new_tokens=10, mode="text", **TEXT)
        text = engine.submit(encode(gill, [user(["tell me a story"])]), story)
        drain(engine, [text])  # ten tokens while the image is still being found
        assert pic.result is None and engine.stats().parked == 1
        release.set()
        events = drain(engine, [pic])[0]
    assert [type(e).__name__ for e in events if not isinstance(e, TextDelta)] == [
        "ImagePending",
        "ImageResult",
        "TurnEnd",
    ]


def test_parked_rows_diffusions_run_as_one_batch_with_their_solo_images(gill):
    gen = gill.image_generator
    draw = GenerationSettings(max_new_tokens=8, mode="generate", min_word_tokens=2, **FORCED)
    turns = [[user([f"draw a {thing}"])] for thing in ("cat", "dog", "bird")]
    solo = []
    for t in turns:
        with Engine(gill, start=False) as engine:
            r = engine.submit(encode(gill, t), dataclasses.replace(draw, seed=len(solo)))
            solo.append(images_of(drain(engine, [r])[0]))
    with Engine(gill, start=False) as engine:
        with gen._lock:  # a diffusion is running: the rows that park meanwhile wait for it together
            reqs = [engine.submit(encode(gill, t), dataclasses.replace(draw, seed=k)) for k, t in enumerate(turns)]
            deadline = time.monotonic() + 30
            while len(gen._pending) < 3 and time.monotonic() < deadline:
                engine.run_step(timeout=0.05)
            assert engine.stats().parked == 3 and len(gen._pending) == 3
        events = drain(engine, reqs)
    assert gen.batches[-1] == 3  # one UNet batch for the three rows' images
    for alone, batched in zip(solo, map(images_of, events), strict=True):
        assert [(i.source, i.seed) for i in batched] == [(i.source, i.seed) for i in alone]
        diff = np.abs(np.asarray(alone[0].image, dtype=int) - np.asarray(batched[0].image, dtype=int))
        assert diff.max() <= 1  # each row's own seeded noise: its solo image up to float rounding


def test_sampled_tokens_follow_each_requests_own_seed(gill):
    s = GenerationSettings(max_new_tokens=10, mode="text", temperature=1.0, seed=11, **TEXT)
    other = dataclasses.replace(s, seed=12)
    with Engine(gill, start=False) as engine:
        alone = engine.submit(encode(gill, [user(["once upon"])]), s)
        drain(engine, [alone])
    with Engine(gill, start=False) as engine:
        reqs = [engine.submit(encode(gill, [user([text])]), st) for text, st in [("a b c", other), ("once upon", s)]]
        drain(engine, reqs)
    assert reqs[1].result.tokens == alone.result.tokens


def test_a_cancelled_request_stops_and_the_others_go_on(gill):
    s = GenerationSettings(max_new_tokens=12, mode="text", **TEXT)
    with Engine(gill, start=False) as engine:
        a, b = (engine.submit(encode(gill, [user([t])]), s) for t in ("one", "two"))
        engine.run_step()
        engine.run_step()
        a.cancel()
        events = drain(engine, [a, b])
    assert events[0][-1].reason == "stopped" and a.result.reason == "stopped" and len(a.result.tokens) == 2
    assert b.result.reason == "max_new_tokens" and len(b.result.tokens) == 12


def test_the_threaded_engine_serves_concurrent_requests(gill):
    s = GenerationSettings(max_new_tokens=6, mode="text", **TEXT)
    with Engine(gill) as engine:
        reqs = [engine.submit(encode(gill, [user([f"question {i}"])]), s) for i in range(4)]
        texts = ["".join(e.text for e in r if isinstance(e, TextDelta)) for r in reqs]
    assert texts == [r.result.text for r in reqs] and all(len(r.result.tokens) == 6 for r in reqs)


def test_settings_the_engine_cannot_serve_are_refused_at_submit(gill):
    with Engine(gill, start=False) as engine:
        prompt = encode(gill, [user(["hi"])])
        with pytest.raises(ValueError, match="decoding='contrastive' is not served by the batching engine"):
            engine.submit(prompt, GenerationSettings(decoding="contrastive"))
        with pytest.raises(ValueError, match="the prompt is .* tokens"):
            engine.submit(encode(gill, [user(["word " * 3000])]), GenerationSettings())
        assert engine.stats().waiting == 0


# ---------------------------------------------------------------------------------------------- prefix cache


def test_a_follow_up_turn_prefills_only_its_new_tokens(gill, monkeypatch):
    s = GenerationSettings(max_new_tokens=6, mode="text", **TEXT)
    sizes: list[int] = []
    forward = gill.model.forward_lm

    def counted(embeds, *a, **k):
        sizes.append(embeds.shape[1])
        return forward(embeds, *a, **k)

    with Engine(gill, start=False) as engine:
        first = [user(["what is in", gill.pictures[1], "this picture?"])]
        r1 = engine.submit(encode(gill, first), s)
        drain(engine, [r1])
        assert r1.result.n_reused == 0
        turns = [*first, Turn("assistant", list(r1.result.segments), tuple(r1.result.tokens)), user(["and then?"])]
        prompt2 = encode(gill, turns)
        monkeypatch.setattr(gill.model, "forward_lm", counted)
        r2 = engine.submit(prompt2, s)
        drain(engine, [r2])
    # cached: turn 1's prompt and every answer token fed back (the last one sampled was not fed)
    cached = len(encode(gill, first)) + len(r1.result.tokens) - 1
    assert r2.result.n_reused == cached and r2.result.n_prefilled == len(prompt2) - cached
    assert sizes[0] == len(prompt2) - cached and all(n == 1 for n in sizes[1:])
    with Engine(gill, start=False) as fresh:  # the cached prefix gives the tokens a full prefill gives
        r3 = fresh.submit(prompt2, s)
        drain(fresh, [r3])
    assert r3.result.n_reused == 0 and r3.result.tokens == r2.result.tokens


def test_a_follow_up_joining_a_batch_is_prefilled_in_its_step_with_its_solo_tokens(gill, monkeypatch):
    s = GenerationSettings(max_new_tokens=6, mode="text", **TEXT)
    story = GenerationSettings(max_new_tokens=12, mode="text", temperature=1.0, seed=3, **TEXT)
    first = [user(["what is in", gill.pictures[1], "this picture?"])]

    def follow_up(engine):  # turn 1 alone (its KV to the prefix cache); turn 2 adds a picture and a question
        r1 = engine.submit(encode(gill, first), s)
        drain(engine, [r1])
        answer = Turn("assistant", list(r1.result.segments), tuple(r1.result.tokens))
        return encode(gill, [*first, answer, user(["and", gill.pictures[2], "this one?"])])

    with Engine(gill, start=False) as engine:
        prompt2 = follow_up(engine)
        alone = engine.submit(prompt2, s)
        drain(engine, [alone])
        other_alone = engine.submit(encode(gill, [user(["tell me a story"])]), story)
        drain(engine, [other_alone])
    shapes: list[tuple[int, int]] = []  # (rows, positions) of each forward
    forward = gill.model.forward_lm

    def counted(embeds, *a, **k):
        shapes.append(tuple(embeds.shape[:2]))
        return forward(embeds, *a, **k)

    with Engine(gill, start=False) as engine:
        prompt2 = follow_up(engine)
        other = engine.submit(encode(gill, [user(["tell me a story"])]), story)  # a sampling row, decoding
        engine.run_step()
        engine.run_step()
        monkeypatch.setattr(gill.model, "forward_lm", counted)
        joined = engine.submit(prompt2, s)
        drain(engine, [other, joined])
    new = len(prompt2) - joined.result.n_reused
    assert joined.result.n_reused > 0 and new > 1 and 2 * new <= engine.mixed_prefill  # 2 rows x its positions
    # no forward of its own: the first step after it joined fed its prompt and the other row's next token
    # (left-padded), then every step one token a row
    assert shapes[0] == (2, new) and all(t == 1 for _, t in shapes[1:])
    assert joined.result.tokens == alone.result.tokens and joined.result.text == alone.result.text
    assert other.result.tokens == other_alone.result.tokens  # its seeded draws untouched by the joining row


@pytest.mark.parametrize("budget", ["off", "over"])
def test_a_follow_up_over_the_step_budget_prefills_alone(gill, monkeypatch, budget):
    with pytest.raises(ValueError, match="mixed_prefill must be an integer >= 0"):
        Engine(gill, start=False, mixed_prefill=-1)
    s = GenerationSettings(max_new_tokens=4, mode="text", **TEXT)
    with Engine(gill, start=False) as engine:
        r1 = engine.submit(encode(gill, [user(["hello there"])]), s)
        drain(engine, [r1])
        turns = [user(["hello there"]), Turn("assistant", list(r1.result.segments), tuple(r1.result.tokens))]
        prompt2 = encode(gill, [*turns, user(["and then?"])])
        new = len(prompt2) - (len(encode(gill, turns[:1])) + len(r1.result.tokens) - 1)
        # off: never in a step; over: alone it would fit, but beside a running row the step is 2 x new positions
        engine.mixed_prefill = 0 if budget == "off" else new
        other = engine.submit(encode(gill, [user(["tell me a story"])]), s)
        engine.run_step()
        shapes: list[tuple[int, int, bool]] = []  # per forward: rows, positions, without a batch mask
        forward = gill.model.forward_lm

        def counted(embeds, mask, **k):
            shapes.append((*embeds.shape[:2], mask is None))
            return forward(embeds, mask, **k)

        monkeypatch.setattr(gill.model, "forward_lm", counted)
        r2 = engine.submit(prompt2, s)
        drain(engine, [r2, other])
    assert r2.result.n_reused > 0 and r2.result.n_prefilled == new
    assert shapes[0] == (1, new, True)  # a prefill of its own (no batch mask), then the steps of one token a row
    assert all(t == 1 and not alone for _, t, alone in shapes[1:])


def kv(n: int, value: float = 0.0):
    return [(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), value)) for _ in range(2)]


def test_the_prefix_cache_is_an_lru_bounded_in_bytes():
    cache = PrefixCache(max_bytes=kv_bytes(kv(22)))  # room for 22 positions
    assert cache.store(range(0, 10), kv(10, 0.0)) and cache.store(range(100, 110), kv(10, 1.0))
    n, got = cache.lookup([0, 1, 2, 99])  # touches the first: the second is now the oldest
    assert n == 3 and got[0][0].shape == (1, 2, 3, 4)
    assert cache.store(range(200, 210), kv(10, 2.0))
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2 and cache.stats().evictions == 1
    assert cache.lookup(range(100, 110))[0] == 0 and cache.lookup(range(0, 10))[0] == 10
    # a turn that extends a cached conversation replaces it; a larger-than-the-cache one is not kept
    assert cache.store(range(0, 12), kv(12, 0.0)) and len(cache) == 2
    assert cache.lookup(range(0, 12))[0] == 12
    assert not cache.store(range(300, 330), kv(30)) and cache.nbytes <= cache.max_bytes


def test_the_engines_prefix_cache_stays_within_its_bytes(gill):
    s = GenerationSettings(max_new_tokens=4, mode="text", **TEXT)
    with Engine(gill, start=False) as probe:
        r = probe.submit(encode(gill, [user(["conversation 0"])]), s)
        drain(probe, [r])
        one = probe.prefix_cache.nbytes
    with Engine(gill, start=False, kv_cache_bytes=int(2.5 * one)) as engine:
        for i in range(5):
            drain(engine, [engine.submit(encode(gill, [user([f"conversation {i}"])]), s)])
            assert engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
        assert len(engine.prefix_cache) == 2 and engine.prefix_cache.stats().evictions == 3


# ---------------------------------------------------------------------------------------------- image budget


def png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_decoding_past_the_budget_waits_or_is_refused():
    need = 100 * 80 * DECODE_BYTES_PER_PIXEL
    budget = ImageBudget(max_bytes=2 * need)
    data = png(100, 80)
    with budget.reserve(need), budget.reserve(need):  # two decodes in progress fill it
        with pytest.raises(OverCapacity, match="retry shortly"):
            budget.decode(data, timeout=0)
        with pytest.raises(OverCapacity):
            budget.decode(data, timeout=0.05)
    assert budget.in_use == 0
    image = budget.decode(data)  # room again; the reservation ends with the decode
    assert image.size == (100, 80) and budget.in_use == 0

    held = budget.reserve(2 * need)
    held.__enter__()
    threading.Timer(0.2, held.__exit__, (None, None, None)).start()
    t = time.monotonic()
    assert budget.decode(data, timeout=10).size == (100, 80)  # waits for the release
    assert time.monotonic() - t >= 0.15
    with pytest.raises(OverCapacity, match="more than the server's whole image budget"):
        budget.decode(png(200, 200), timeout=None)
    with pytest.raises(ImageError, match="not a readable image"):
        budget.decode(b"not an image at all")


# ---------------------------------------------------------------------------------------------- adapters


def test_an_engine_chat_holds_a_conversation_like_a_chat(gill):
    s = GenerationSettings(max_new_tokens=5, mode="text", **TEXT)
    messages = [["hello", gill.pictures[2]], ["tell me more"], ["and again"]]
    chat = Chat(gill)
    with Engine(gill) as engine:
        served = EngineChat(engine)
        held = 0  # what the prefix cache holds of this conversation after each turn
        for message in messages:
            a = [e for e in chat.send(message, s) if not isinstance(e, TurnEnd)]
            b = [e for e in served.send(message, s) if not isinstance(e, TurnEnd)]
            assert a == b
            assert served.history[-1].tokens == chat.history[-1].tokens
            assert served.last_result.n_reused == held  # every earlier position came from the cache
            held = served.last_result.n_prompt + len(served.last_result.tokens) - 1
        served.undo()
        assert len(served.history) == 4


def test_the_engine_backend_streams_a_turn_in_the_protocol(gill):
    from fromage_gill.serve.backend import ChatBackend, ChatMessage, ChatRequest, ImageInput, Overloaded, Served, Usage

    backend = EngineBackend(gill, image_budget_gb=1e-9)
    assert isinstance(backend, ChatBackend)
    s = GenerationSettings(max_new_tokens=4, mode="text", **TEXT)

    async def collect(request):
        return [e async for e in backend.stream(request)]

    events = asyncio.run(collect(ChatRequest((ChatMessage("user", ("hi there",)),), s)))
    assert isinstance(events[0], Served) and isinstance(events[-2], Usage) and isinstance(events[-1], TurnEnd)
    assert events[-2].completion_tokens == 4
    # a picture larger than the (tiny) image budget: 429, typed
    big = ChatRequest((ChatMessage("user", ("look", ImageInput("messages[0].content[1]", data=png(64, 64)))),), s)
    with pytest.raises(Overloaded, match="image budget") as err:
        asyncio.run(collect(big))
    assert err.value.status == 429
    assert backend._inflight == 0  # the refused request gave its place back
    asyncio.run(backend.aclose())


def test_an_engine_backend_request_left_mid_answer_stops_and_gives_its_place_back(gill):
    from fromage_gill.serve.backend import ChatMessage, ChatRequest, Overloaded

    backend = EngineBackend(gill, max_batch=1, max_queue=0)  # room for one request
    long = GenerationSettings(max_new_tokens=300, mode="text", **TEXT)
    short = GenerationSettings(max_new_tokens=3, mode="text", **TEXT)

    async def scenario():
        first = backend.stream(ChatRequest((ChatMessage("user", ("tell me a long story",)),), long))
        seen = [type(await anext(first)).__name__ for _ in range(3)]  # Served, then its first words
        with pytest.raises(Overloaded, match="the server is full"):  # its place is taken meanwhile
            await anext(backend.stream(ChatRequest((ChatMessage("user", ("hi",)),), short)))
        await first.aclose()  # the client leaves: the turn ends at the engine's next step, its place comes back
        deadline = time.monotonic() + 30
        while True:
            try:
                events = [e async for e in backend.stream(ChatRequest((ChatMessage("user", ("hi",)),), short))]
                break
            except Overloaded:
                assert time.monotonic() < deadline, "the place of the request that left never came back"
                await asyncio.sleep(0.01)
        return seen, events

    seen, events = asyncio.run(scenario())
    assert seen == ["Served", "TextDelta", "TextDelta"]
    assert isinstance(events[-1], TurnEnd) and events[-1].reason == "max_new_tokens"
    assert backend.engine.stats().tokens < 300 + 3  # the long turn stopped early
    asyncio.run(backend.aclose())


def test_an_engine_chat_turn_left_early_keeps_its_answer_so_far(gill):
    s = GenerationSettings(max_new_tokens=300, mode="text", **TEXT)
    with Engine(gill) as engine:
        chat = EngineChat(engine)
        events = chat.send(["hello"], s)
        assert isinstance(next(events), TextDelta)
        events.close()  # the consumer goes away: the engine stops the row at its next step
        assert chat.last_result.reason == "stopped" and 1 <= len(chat.history[-1].tokens) < 300


def test_eager_attention_gets_the_same_tokens_alone_or_batched(make_pipeline):
    pipe = make_pipeline("tiny-gill", load_diffusion_pipeline=False)
    pipe.model.lm.set_attn_implementation("eager")  # the engine hands it an additive 4D mask instead of sdpa's bool
    s = GenerationSettings(max_new_tokens=10, mode="text", **TEXT)
    prompts = [encode(pipe, [user([t])]) for t in ("hi", "a longer question about the picture", "x y")]
    alone = []
    for p in prompts:
        with Engine(pipe, start=False) as engine:
            r = engine.submit(p, s)
            drain(engine, [r])
            alone.append(r.result.tokens)
    with Engine(pipe, start=False) as engine:
        reqs = [engine.submit(p, s) for p in prompts]
        drain(engine, reqs)
    assert [r.result.tokens for r in reqs] == alone
