"""The generation engine on the tiny presets: KV-cache parity, stops, images mid-turn, modes, batching, Chat."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fromage_gill.config import ConfigError
from fromage_gill.generate import (
    Chat,
    GenerationSettings,
    ImagePending,
    ImageResult,
    Notice,
    StepState,
    TextDelta,
    TurnEnd,
    generate_batch,
    image_token_states,
)
from fromage_gill.generate.prompt import ImageSegment, Turn, VisionCache, normalize_message
from fromage_gill.images import ImageError
from fromage_gill.retrieve import ImageIndex

GREEDY_TEXT = GenerationSettings(max_new_tokens=10, mode="text", stop_at_eos=False, stop_strings=())


# ---------------------------------------------------------------------------------------------- helpers


def reference_greedy(pipe, embeds: torch.Tensor, n: int) -> list[int]:
    """The reference-style loop: run the LM over the whole sequence at every step, image tokens suppressed."""
    m = pipe.model
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = m.forward_lm(embeds[None], logits="last").logits[0, -1]
            logits[m.image_token_ids] = -float("inf")
            tok = int(logits.argmax())
            out.append(tok)
            embeds = torch.cat([embeds, m.embed_tokens(torch.tensor([[tok]]))[0]])
    return out


def ids(pipe, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def run(chat, message, settings):
    return list(chat.send(message, settings))


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


class LMCalls:
    """Records how many positions each LM forward ran on."""

    def __init__(self, monkeypatch, model):
        self.sizes: list[int] = []
        orig = model.forward_lm

        def wrapped(embeds, *a, **k):
            self.sizes.append(embeds.shape[1])
            return orig(embeds, *a, **k)

        monkeypatch.setattr(model, "forward_lm", wrapped)


def scripted(pipeline, settings, images):
    """A decoding strategy for tests: plays ``decoding_options['script']`` (per row, or one list for all rows), with
    ``None`` meaning "greedy here", then greedy."""
    script = settings.decoding_options["script"]

    def choose(state: StepState) -> torch.Tensor:
        out = state.logits.argmax(-1)
        for j, b in enumerate(state.rows):
            row_script = script[b] if isinstance(script[0], list) else script
            step = len([t for t in state.generated[j] if t not in state.model.image_token_ids[1:]])
            if step < len(row_script) and row_script[step] is not None:
                out[j] = row_script[step]
        return out

    return choose


@pytest.fixture(autouse=True)
def _scripted_decoding(monkeypatch):
    """Known to this module's tests only (the app lists the static strategies)."""
    from fromage_gill import settings
    from fromage_gill.generate import decoding

    monkeypatch.setattr(settings, "DECODINGS", (*settings.DECODINGS, "test-script"))
    monkeypatch.setitem(decoding.STRATEGIES, "test-script", scripted)


def script(script, **kw) -> GenerationSettings:
    kw.setdefault("max_new_tokens", 12)
    return GenerationSettings(decoding="test-script", decoding_options={"script": script}, **kw)


@pytest.fixture
def index_over(tmp_path):
    """An image index over the given images, built with the model's own embeddings, saved as PNG files."""

    def make(pipe, imgs):
        m = pipe.model
        with torch.no_grad():
            emb = m.image_embedding(m.encode_images(m.vision.processor(imgs)))
        records = []
        for i, img in enumerate(imgs):
            path = tmp_path / f"img{i}.png"
            img.save(path)
            records.append({"path": str(path), "url": None, "caption": f"picture {i}"})
        return ImageIndex.from_embeddings(emb, records, m.retrieval_fingerprint())

    return make


class Counter:
    def __init__(self, monkeypatch, obj, name):
        self.n = 0
        orig = getattr(obj, name)

        def wrapped(*a, **k):
            self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(obj, name, wrapped)


# ---------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("preset", ["tiny_fromage", "tiny_gill"])
def test_cached_decode_equals_full_recomputation_across_turns(preset, request, images, monkeypatch):
    pipe = request.getfixturevalue(preset)
    chat = Chat(pipe)
    calls = LMCalls(monkeypatch, pipe.model)
    for msg in (["look:", images[0], "what is it?"], [images[1], "and this one?"], ["and now?"]):
        prompt = chat._encode([*chat.history, Turn("user", normalize_message(msg))])
        embeds = prompt.embed(pipe.model, VisionCache())
        cached_before = chat.cached_tokens
        calls.sizes.clear()
        events = run(chat, msg, GREEDY_TEXT)
        sizes = list(calls.sizes)
        assert list(chat.history[-1].tokens) == reference_greedy(pipe, embeds, GREEDY_TEXT.max_new_tokens)
        assert isinstance(events[-1], TurnEnd) and events[-1].reason == "max_new_tokens"
        # the first forward of a turn runs only the positions the cache does not hold yet
        assert sizes[0] == len(prompt) - prompt.common_prefix(chat._cache_keys[:cached_before] or [None])
        assert sizes[1:] == [1] * (GREEDY_TEXT.max_new_tokens - 1)
    assert sizes[0] < len(prompt) // 3  # turn 3: "\nQ: and now?\nA:" and the last answer token, not the history


# ---------------------------------------------------------------------------------------------- sampling, stops


def test_seed_reproduces_a_sampled_turn(tiny_gill, images):
    s = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=100, seed=1234, mode="text")
    a = run(Chat(tiny_gill), ["hello", images[0]], s)
    b = run(Chat(tiny_gill), ["hello", images[0]], s)
    assert a == b and a[-1].seed == 1234
    c = run(Chat(tiny_gill), ["hello", images[0]], dataclasses.replace(s, seed=99))
    assert text_of(c) != text_of(a)
    # seed=None draws a fresh seed and reports it; regenerating with it reproduces the answer
    chat = Chat(tiny_gill)
    first = run(chat, ["hello"], dataclasses.replace(s, seed=None))
    again = list(chat.regenerate(dataclasses.replace(s, seed=first[-1].seed)))
    assert again == first and len(chat.history) == 2
    other = list(chat.regenerate(dataclasses.replace(s, seed=None)))
    assert other[-1].seed != first[-1].seed


def test_eos_ends_the_turn(tiny_fromage):
    eos = tiny_fromage.tokenizer.eos_token_id
    chat = Chat(tiny_fromage)
    events = run(chat, ["hi"], script([*ids(tiny_fromage, " a cat"), eos, 5, 6], mode="text"))
    assert events[-1] == TurnEnd("eos", events[-1].seed)
    assert text_of(events) == " a cat"
    assert chat.history[-1].tokens == tuple(ids(tiny_fromage, " a cat")) and chat.history[-1].text == " a cat"


def test_turn_boundary_stops_and_is_never_shown(tiny_fromage, monkeypatch):
    pipe = tiny_fromage
    chat = Chat(pipe)
    answer = ids(pipe, " a cat.")
    events = run(chat, ["hi"], script([*answer, *ids(pipe, "\nQ: and more")], mode="text"))
    assert events[-1].reason == "turn_boundary"
    assert text_of(events) == " a cat." and "\n" not in text_of(events)
    assert chat.history[-1].tokens == tuple(answer)
    # the next turn reuses the cache up to the answer (and the "\nQ" it fed before stopping): only new positions run
    first_prompt = chat._encode(chat.history[:1])
    keys = list(chat._cache_keys)
    calls = LMCalls(monkeypatch, pipe.model)
    run(chat, ["ok"], GREEDY_TEXT)
    new_prompt = chat._encode(chat.history[:-1])
    assert new_prompt.common_prefix(keys) >= len(first_prompt) + len(answer)
    assert calls.sizes[0] == len(new_prompt) - new_prompt.common_prefix(keys)


def test_stop_string_inside_a_token_keeps_the_text_before_it(tiny_fromage):
    pipe = tiny_fromage
    chat = Chat(pipe)
    events = run(chat, ["hi"], script(ids(pipe, " a cat sat"), mode="text", stop_strings=("at s",)))
    assert events[-1].reason == "turn_boundary" and text_of(events) == " a c"
    assert pipe.tokenizer.decode(chat.history[-1].tokens) == " a c"


def test_stop_mid_stream_keeps_what_streamed(tiny_gill):
    chat = Chat(tiny_gill)
    seen = []
    for ev in chat.send(["tell me"], dataclasses.replace(GREEDY_TEXT, max_new_tokens=30)):
        seen.append(ev)
        if sum(isinstance(e, TextDelta) for e in seen) == 3:
            chat.stop()
        if isinstance(ev, TurnEnd):  # the answer is in the history as soon as TurnEnd arrives
            assert chat.history[-1].role == "assistant" and chat.history[-1].text == text_of(seen)
    assert seen[-1].reason == "stopped"
    assert chat.history[-1].text == text_of(seen) and len(chat.history[-1].tokens) == 3
    # a consumer that walks away mid-turn: the next call closes the turn, keeping its text
    gen = chat.send(["more"], GREEDY_TEXT)
    got = [next(gen), next(gen)]
    chat.undo()  # closes the abandoned turn first, then drops it
    assert len(chat.history) == 2 and got


# ---------------------------------------------------------------------------------------------- images


def test_forced_image_then_more_text_gill_generate(tiny_gill, images, monkeypatch):
    unet = Counter(monkeypatch, tiny_gill.diffusion.unet, "forward")
    chat = Chat(tiny_gill)
    s = GenerationSettings(
        max_new_tokens=6,
        mode="generate",
        image_logit_bias=float("inf"),
        max_images=1,
        num_inference_steps=2,
        stop_at_eos=False,
        stop_strings=(),
        seed=5,
    )
    msg = ["draw", images[0]]
    prompt = chat._encode([Turn("user", normalize_message(msg))])
    events = run(chat, msg, s)
    kinds = [type(e).__name__ for e in events]
    assert kinds[:4] == ["ImagePending", "ImageProgress", "ImageProgress", "ImageResult"], "a step each, then it"
    assert kinds[-1] == "TurnEnd" and "TextDelta" in kinds[4:]
    res = events[3]
    assert res.source == "generated" and res.seed == 5 and res.image.size[0] > 1  # the first image: the turn's seed
    assert -1.0 <= res.score <= 1.0 and abs(sum(res.decision) - 1) < 1e-5
    assert unet.n == 2
    turn = chat.history[-1]
    assert isinstance(turn.segments[0], ImageSegment) and isinstance(turn.segments[1], str)
    r = tiny_gill.model.image_token_ids
    assert list(turn.tokens[:8]) == r
    # the text after the image is what full recomputation gives after the 8 image tokens
    m = tiny_gill.model
    embeds = torch.cat([prompt.embed(m, VisionCache()), m.embed_tokens(torch.tensor([r]))[0]])
    assert list(turn.tokens[8:]) == reference_greedy(tiny_gill, embeds, 5)
    # same seed, same picture
    again = run(Chat(tiny_gill), msg, s)
    assert np.array_equal(np.asarray(again[3].image), np.asarray(res.image))


def test_fromage_retrieves_distinct_images_and_excludes_shown_ones(tiny_fromage, images, index_over):
    pipe = dataclasses.replace(tiny_fromage, index=index_over(tiny_fromage, images))
    s = script(
        [pipe.model.image_token_ids[0], None, pipe.model.image_token_ids[0], None, None],
        mode="retrieve",
        max_images=2,
        max_new_tokens=5,
    )
    chat = Chat(pipe)
    first = [e for e in run(chat, ["show me"], s) if isinstance(e, ImageResult)]
    second = [e for e in run(chat, ["more"], s) if isinstance(e, ImageResult)]
    got = [e.index_id for e in first + second]
    assert sorted(got) == [0, 1, 2, 3]  # four different pictures: shown ones are never retrieved again
    assert all(
        e.source == "retrieved" and e.decision is None and e.caption == f"picture {e.index_id}" for e in first + second
    )
    q = pipe.model.text_embedding  # the score is the index's cosine similarity
    assert all(-1.0 <= e.score <= 1.0 for e in first)
    assert q is not None
    turn = chat.history[1]
    assert sum(isinstance(s, ImageSegment) for s in turn.segments) == 2  # the answer's ImageResults, as segments


def test_mode_text_never_yields_an_image(tiny_gill, tiny_fromage, images, index_over):
    for pipe in (
        dataclasses.replace(tiny_gill, index=index_over(tiny_gill, images)),
        dataclasses.replace(tiny_fromage, index=index_over(tiny_fromage, images)),
    ):
        s = GenerationSettings(max_new_tokens=8, mode="text", image_logit_bias=float("inf"))
        events = run(Chat(pipe), ["show me a picture"], s)
        assert not any(isinstance(e, (ImagePending, ImageResult)) for e in events)
        assert not any(
            isinstance(e, (ImagePending, ImageResult)) for e in generate_batch(pipe, [["a"], ["b b"]], s)[0].segments
        )


def test_retrieve_never_runs_the_unet_and_generate_never_searches(tiny_gill, images, index_over, monkeypatch):
    pipe = dataclasses.replace(tiny_gill, index=index_over(tiny_gill, images))
    unet = Counter(monkeypatch, tiny_gill.diffusion.unet, "forward")
    search = Counter(monkeypatch, pipe.index, "search")
    base = dict(max_new_tokens=3, image_logit_bias=float("inf"), max_images=1, num_inference_steps=2)
    events = run(Chat(pipe), ["x"], GenerationSettings(mode="retrieve", **base))
    assert [e.source for e in events if isinstance(e, ImageResult)] == ["retrieved"]
    assert unet.n == 0 and search.n == 1
    events = run(Chat(pipe), ["x"], GenerationSettings(mode="generate", **base))
    assert [e.source for e in events if isinstance(e, ImageResult)] == ["generated"]
    assert search.n == 1 and unet.n == 2
    # auto: the decision head picks, and only the chosen path runs
    unet.n = search.n = 0
    res = [e for e in run(Chat(pipe), ["x"], GenerationSettings(mode="auto", **base)) if isinstance(e, ImageResult)][0]
    p_gen, p_ret = res.decision
    assert res.source == ("retrieved" if p_ret > p_gen else "generated")
    assert (unet.n, search.n) == ((0, 1) if res.source == "retrieved" else (2, 0))


def test_auto_without_any_image_path_turns_images_off_with_a_notice(tiny_fromage):
    chat = Chat(tiny_fromage)
    events = run(chat, ["x"], GenerationSettings(max_new_tokens=3, image_logit_bias=float("inf")))
    assert isinstance(events[0], Notice) and "images are off" in events[0].text
    assert not any(isinstance(e, ImageResult) for e in events)
    assert not any(isinstance(e, Notice) for e in run(chat, ["y"], GenerationSettings(max_new_tokens=3)))


def test_visual_features_are_computed_once_across_turns(tiny_gill, images, monkeypatch):
    enc = Counter(monkeypatch, tiny_gill.model, "encode_images")
    chat = Chat(tiny_gill)
    run(chat, ["look", images[0]], GREEDY_TEXT)
    run(chat, ["again", images[0].copy(), "and", images[1]], GREEDY_TEXT)
    assert chat.vision_cache.n_encoded == 2 and enc.n == 2  # image 0 once, image 1 once


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("preset", ["tiny_fromage", "tiny_gill"])
def test_batched_greedy_equals_unbatched(preset, request, images):
    pipe = request.getfixturevalue(preset)
    prompts = [["a photo of", images[0], "a dog on the grass"], ["hi"], [images[1], "what", images[2], "is this?"]]
    s = dataclasses.replace(GREEDY_TEXT, max_new_tokens=8)
    batched = generate_batch(pipe, prompts, s)
    single = [generate_batch(pipe, [p], s)[0] for p in prompts]
    assert [b.tokens for b in batched] == [o.tokens for o in single]
    assert [b.text for b in batched] == [o.text for o in single]
    # with the dialogue template, one prompt equals a Chat turn
    chat_tokens = Chat(pipe)
    run(chat_tokens, prompts[0], s)
    assert generate_batch(pipe, prompts[:1], s, dialogue=True)[0].tokens == list(chat_tokens.history[-1].tokens)


def test_batched_images_at_different_steps_equal_unbatched(tiny_fromage, images, index_over):
    pipe = dataclasses.replace(tiny_fromage, index=index_over(tiny_fromage, images))
    ret = pipe.model.image_token_ids[0]
    scripts = [[None, ret], [None, None, None, ret], [ret, None, None], [None]]
    prompts = [["one"], ["two two", images[0]], ["three three three"], ["four"]]
    s = dict(mode="retrieve", max_new_tokens=6, stop_at_eos=False, stop_strings=())
    batched = generate_batch(pipe, prompts, script(scripts, **s))
    single = [generate_batch(pipe, [p], script([sc], **s))[0] for p, sc in zip(prompts, scripts, strict=True)]
    assert [b.tokens for b in batched] == [o.tokens for o in single]
    assert [[i.index_id for i in b.images] for b in batched] == [[i.index_id for i in o.images] for o in single]
    assert [len(b.images) for b in batched] == [1, 1, 1, 0]


# ---------------------------------------------------------------------------------------------- bad input


def snapshot(chat):
    return list(chat.history), list(chat._cache_keys), chat._first


def test_bad_input_raises_clearly_and_leaves_the_chat_unchanged(tiny_fromage, tiny_gill, images):
    chat = Chat(tiny_fromage)
    run(chat, ["hello", images[0]], GREEDY_TEXT)
    before = snapshot(chat)
    cases = [
        (lambda: chat.send([], GREEDY_TEXT), ValueError, "empty"),
        (lambda: chat.send(["  "], GREEDY_TEXT), ValueError, "empty"),
        (lambda: chat.send(["word " * 1000], GREEDY_TEXT), ValueError, r"is \d+ tokens.*the LM fits 512"),
        (lambda: chat.send(["look", b""], GREEDY_TEXT), ImageError, "empty"),
        (lambda: chat.send(["look", b"\x89PNG\r\n\x1a\n garbage"], GREEDY_TEXT), ImageError, "not a readable"),
        (lambda: chat.send(["x"], GenerationSettings(mode="retrieve")), ValueError, "needs an image index"),
        (lambda: chat.send(["x"], GenerationSettings(mode="generate")), ValueError, "fromage model"),
        (lambda: chat.truncate(7), ValueError, r"n_turns must be an integer in \[0, 2\]"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        assert snapshot(chat) == before
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p.*\(0, 1\]"):
            GenerationSettings(top_p=bad)
    with pytest.raises(ValueError, match="nothing to regenerate"):
        Chat(tiny_gill).regenerate()
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="decoding.*default"):
        GenerationSettings(decoding="beam")
    with pytest.raises(ValueError, match=r"prompts\[1\] is \d+ tokens"):
        generate_batch(tiny_fromage, [["ok"], ["word " * 1000]], GREEDY_TEXT)
    # the chat still works and answers as if nothing had happened
    again = Chat(tiny_fromage)
    run(again, ["hello", images[0]], GREEDY_TEXT)
    assert [t.tokens for t in again.history] == [t.tokens for t in chat.history]
    run(chat, ["next"], GREEDY_TEXT)
    assert len(chat.history) == 4


def test_an_error_mid_turn_rolls_back(tiny_fromage, images, index_over, monkeypatch):
    pipe = dataclasses.replace(tiny_fromage, index=index_over(tiny_fromage, images))
    chat = Chat(pipe)
    run(chat, ["hello"], GREEDY_TEXT)
    before = list(chat.history)

    def broken(*a, **k):
        raise RuntimeError("index on fire")

    monkeypatch.setattr(pipe.index, "search", broken)
    with pytest.raises(RuntimeError, match="on fire"):
        run(chat, ["show"], GenerationSettings(mode="retrieve", image_logit_bias=float("inf"), max_new_tokens=3))
    assert chat.history == before
    run(chat, ["go on"], GREEDY_TEXT)
    ref = Chat(tiny_fromage)
    run(ref, ["hello"], GREEDY_TEXT)
    run(ref, ["go on"], GREEDY_TEXT)
    assert chat.history[-1].tokens == ref.history[-1].tokens


def test_long_history_drops_oldest_turns_with_a_notice(tiny_fromage):
    chat = Chat(tiny_fromage)
    eos = tiny_fromage.tokenizer.eos_token_id
    s = script([eos], max_new_tokens=460, mode="text")  # leaves 52 prompt positions; every answer is empty
    msg = ["tell me a story about a cat"]
    one = len(chat._encode([Turn("user", msg)]))
    assert 15 < one < 26
    notices = [[e.text for e in run(chat, msg, s) if isinstance(e, Notice)] for _ in range(4)]
    assert notices[:2] == [[], []]  # two exchanges fit
    assert "the 2 oldest turn(s) were left out" in notices[2][0] and "512 tokens" in notices[2][0]
    assert len(chat.history) == 8  # the visible conversation keeps everything
    assert chat._first == 4 and chat.cached_tokens <= 52


def test_max_exchanges_reads_only_the_latest_exchanges_without_a_notice(tiny_gill):
    """dialogue.max_exchanges: the prompt keeps that many earlier exchanges (0: each message alone), the answers
    equal those of a chat that only ever had them, no "left out" notice is given, and the history keeps all."""
    from fromage_gill.config import DialogueSpec

    alone = Chat(tiny_gill, dialogue=DialogueSpec(max_exchanges=0))
    window = Chat(tiny_gill, dialogue=DialogueSpec(max_exchanges=1))
    for chat in (alone, window):
        events = [e for msg in ("one", "two", "three") for e in run(chat, [msg], GREEDY_TEXT)]
        assert not [e for e in events if isinstance(e, Notice)] and len(chat.history) == 6
    fresh = Chat(tiny_gill)
    run(fresh, ["three"], GREEDY_TEXT)
    assert alone.history[-1].tokens == fresh.history[-1].tokens
    last_two = Chat(tiny_gill)
    run(last_two, ["two"], GREEDY_TEXT)
    run(last_two, ["three"], GREEDY_TEXT)
    assert window.history[-1].tokens == last_two.history[-1].tokens
    # the prompts themselves: the last message alone / the last two exchanges, where the default reads all three
    assert alone._plan(alone.history[:-1], GREEDY_TEXT)[0].keys == fresh._encode(fresh.history[:-1]).keys
    assert window._plan(window.history[:-1], GREEDY_TEXT)[0].keys == last_two._encode(last_two.history[:-1]).keys
    everything = Chat(tiny_gill)
    assert everything._plan(window.history[:-1], GREEDY_TEXT)[0].keys == window._encode(window.history[:-1]).keys
    with pytest.raises(ConfigError, match="max_exchanges must be >= 0"):
        DialogueSpec(max_exchanges=-1)


# ---------------------------------------------------------------------------------------------- chat editing


def test_undo_truncate_regenerate(tiny_gill):
    chat = Chat(tiny_gill)
    run(chat, ["one"], GREEDY_TEXT)
    run(chat, ["two"], GREEDY_TEXT)
    second = chat.history[-1]
    removed = chat.undo()
    assert [t.role for t in removed] == ["user", "assistant"] and len(chat.history) == 2
    run(chat, ["two"], GREEDY_TEXT)
    again = chat.history[-1]
    assert (again.segments, again.tokens, again.end_reason) == (second.segments, second.tokens, second.end_reason)
    regen = list(chat.regenerate(GREEDY_TEXT))
    assert chat.history[-1].tokens == second.tokens and isinstance(regen[-1], TurnEnd)
    chat.truncate(2)
    run(chat, ["three"], GREEDY_TEXT)
    assert [t.text for t in chat.history if t.role == "user"] == ["one", "three"]
    assert chat.undo() and chat.undo() and chat.undo() == []


def test_export_import_round_trip(tiny_gill, images):
    chat = Chat(tiny_gill)
    s = GenerationSettings(
        max_new_tokens=4, mode="generate", image_logit_bias=float("inf"), max_images=1, num_inference_steps=1, seed=3
    )
    run(chat, ["hi", images[0]], s)
    data = json.loads(json.dumps(chat.to_dict()))
    back = Chat.from_dict(tiny_gill, data)
    assert [t.tokens for t in back.history] == [t.tokens for t in chat.history]
    orig_img, new_img = chat.history[1].segments[0], back.history[1].segments[0]
    assert new_img.key == orig_img.key and new_img.source == "generated" and new_img.seed == orig_img.seed
    assert new_img.decision == pytest.approx(orig_img.decision)
    run(chat, ["more"], GREEDY_TEXT)
    run(back, ["more"], GREEDY_TEXT)
    assert back.history[-1].tokens == chat.history[-1].tokens

    hi, answer = {"role": "user", "segments": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "segments": []}
    bad = [
        ({}, "not a saved chat"),
        ({**data, "version": 9}, "unsupported chat version"),
        ({**data, "turns": "x"}, "'turns' must be a list"),
        ({**data, "turns": [{"role": "robot", "segments": []}]}, "role"),
        ({**data, "turns": [{"role": "user", "segments": [{"type": "image", "png": "!!"}]}, answer]}, "base64"),
        ({**data, "turns": [{"role": "user", "segments": [{"type": "image", "png": ""}]}, answer]}, "empty"),
        ({**data, "turns": [hi, {"role": "assistant", "segments": [], "tokens": [10**9]}]}, "token ids"),
        ({**data, "turns": [{"role": "user", "segments": [{"type": "video"}]}, answer]}, "type 'text' or 'image'"),
    ]
    for d, match in bad:
        with pytest.raises(ValueError, match=match):
            Chat.from_dict(tiny_gill, d)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_generate_json_and_errors(tmp_path, images, capsys):
    from fromage_gill.cli import main

    path = tmp_path / "in.png"
    images[0].save(path)
    code = main(
        [
            "generate",
            "--model",
            "tiny-gill",
            "--image",
            str(path),
            "--text",
            "what is it?",
            "--json",
            "--mode",
            "generate",
            "--image-logit-bias",
            "inf",
            "--max-images",
            "1",
            "--steps",
            "1",
            "--max-new-tokens",
            "4",
            "--seed",
            "7",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "tiny-gill" and doc["seed"] == 7 and doc["reason"] == "max_new_tokens"
    img = doc["segments"][0]
    assert img["type"] == "image" and img["source"] == "generated" and img["seed"] == 7  # the seed reproduces it
    assert (tmp_path / "out" / "answer-image1.png").is_file() and set(img["decision"]) == {"p_generate", "p_retrieve"}
    assert doc["segments"][1]["type"] == "text"

    assert main(["generate", "--model", "tiny-fromage", "--text", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-fromage", "--text", "hi", "--image", str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_llama_style_lm_positions_with_left_padding(tiny_fromage, images):
    """Rotary LMs take positions from position_ids alone: batching and the cache must still match."""
    from fromage_gill.config import LMSpec
    from fromage_gill.pipeline import build_pipeline

    lm = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    cfg = dataclasses.replace(tiny_fromage.config, name="tiny-llama", lm=LMSpec(source="random", config=lm))
    pipe = build_pipeline(cfg, device=torch.device("cpu"), dtype=torch.float32)
    prompts = [["a photo of", images[0], "a dog on the grass"], ["hi"]]
    s = dataclasses.replace(GREEDY_TEXT, max_new_tokens=6)
    batched = generate_batch(pipe, prompts, s)
    assert [b.tokens for b in batched] == [generate_batch(pipe, [p], s)[0].tokens for p in prompts]
    chat = Chat(pipe)
    for msg in (prompts[0], ["and?"]):
        embeds = chat._encode([*chat.history, Turn("user", normalize_message(msg))]).embed(pipe.model, VisionCache())
        run(chat, msg, s)
        assert list(chat.history[-1].tokens) == reference_greedy(pipe, embeds, 6)


def test_a_models_generation_defaults_apply_unless_the_caller_sets_them(tiny_gill, images, index_over):
    cfg = dataclasses.replace(
        tiny_gill.config,
        generation={"image_logit_bias": float("inf"), "max_images": 1, "mode": "retrieve", "max_new_tokens": 3},
    )
    pipe = dataclasses.replace(tiny_gill, config=cfg, index=index_over(tiny_gill, images))
    assert GenerationSettings.for_model(cfg).max_images == 1
    assert GenerationSettings.for_model(cfg, max_images=2).max_images == 2
    events = list(Chat(pipe).send(["x"]))  # no settings: the model's defaults, which force one retrieved image
    assert [e.source for e in events if isinstance(e, ImageResult)] == ["retrieved"]
    events = run(Chat(pipe), ["x"], GenerationSettings(max_new_tokens=3, mode="text"))
    assert not any(isinstance(e, ImageResult) for e in events)


def test_text_after_images_false_ends_the_answer_with_its_image(tiny_gill, images, index_over):
    pipe = dataclasses.replace(tiny_gill, index=index_over(tiny_gill, images))
    base = dict(max_new_tokens=20, image_logit_bias=float("inf"), mode="retrieve", min_word_tokens=2)
    events = run(Chat(pipe), ["x"], GenerationSettings(text_after_images=False, **base))
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["ImageResult", "TurnEnd"] and events[-1].reason == "image", kinds
    assert kinds.count("ImageResult") == 1
    events = run(Chat(pipe), ["x"], GenerationSettings(**base))
    assert [type(e).__name__ for e in events].count("ImageResult") == 2  # max_images: text, then a second image


def test_image_query_answer_reads_the_image_tokens_after_the_answer_alone(tiny_gill, images, index_over, monkeypatch):
    pipe = dataclasses.replace(tiny_gill, index=index_over(tiny_gill, images))
    queries = []
    search = pipe.index.search
    monkeypatch.setattr(pipe.index, "search", lambda q, *a, **k: (queries.append(q), search(q, *a, **k))[1])
    base = dict(
        max_new_tokens=12,
        image_logit_bias=float("inf"),
        mode="retrieve",
        min_word_tokens=3,
        max_images=1,
        text_after_images=False,
        seed=0,
    )
    for how in ("dialogue", "answer"):
        events = run(Chat(pipe), ["describe a cat"], GenerationSettings(image_query=how, **base))
    answer = text_of(events).strip()
    assert answer and len(queries) == 2
    expected = pipe.model.text_embedding(image_token_states(pipe, [answer])[:, 0])
    torch.testing.assert_close(queries[1], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(queries[0], queries[1], atol=1e-3)  # the whole dialogue gives another state
    with pytest.raises(ValueError, match="image_query"):
        GenerationSettings(image_query="prompt")
