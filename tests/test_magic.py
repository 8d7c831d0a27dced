"""MAGIC decoding and contrastive search on tiny models, checked against a direct (slow, obviously correct)
implementation of the rule that runs the LM over the full sequence for every candidate."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fromage_gill import magic
from fromage_gill.config import ConfigError, MagicConfig, MagicDecoding, list_presets, load_config
from fromage_gill.magic import continuation_ids, grounded_step, hf_step, load_magic, magic_search


@pytest.fixture(scope="module")
def tiny():
    return load_magic("tiny-magic", device="cpu", dtype="fp32")


# ------------------------------------------------------------------------------ the direct reference


def lm_full_forward(lm):
    """ids -> (next-token logits (V,), last-layer hidden states (T, d)), no cache, through the LM-head model."""

    def forward(ids: list[int]):
        out = lm(input_ids=torch.tensor([ids]), output_hidden_states=True)
        return out.logits[0, -1].float(), out.hidden_states[-1][0].float()

    return forward


@torch.no_grad()
def direct_search(forward, prompt_ids, s: MagicDecoding, *, clip=None, decode=None, stop=(), vocab_limit=None):
    """The rule, literally: per step and per candidate v, run the LM over prompt + continuation + v."""
    ids, generated, steps = list(prompt_ids), [], []
    for _ in range(s.max_new_tokens):
        logits, _ = forward(ids)
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        probs = logits.softmax(-1)
        top = probs.topk(min(s.k, probs.shape[0])).indices.tolist()
        f = [0.0] * len(top)
        if s.beta > 0:
            f = clip([decode((generated + [v])[-s.clip_text_max_tokens :]) for v in top]).softmax(-1).tolist()
        scores = []
        for j, v in enumerate(top):
            _, hidden = forward(ids + [v])
            penalty = F.cosine_similarity(hidden[-1:], hidden[:-1], dim=-1).max().item()  # vs every earlier position
            scores.append((1 - s.alpha) * probs[v].item() - s.alpha * penalty + s.beta * f[j])
        best = max(range(len(top)), key=lambda j: (scores[j], -j))  # ties: the likelier candidate
        steps.append(top)
        if top[best] in stop:
            break
        ids.append(top[best])
        generated.append(top[best])
    return generated, steps


def run_fast(m, prompt_ids, s, clip=None, decode=None):
    step = hf_step(m.lm)
    start = step(torch.tensor([prompt_ids]), None)
    return list(
        magic_search(step, start, s, decode=decode or m.tokenizer.decode, clip_logits=clip, stop_ids=m.stop_ids)
    )


def prompt(m, text="a photo of"):
    return m.prompt_ids(text)[0].tolist()


# ------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(("k", "alpha"), [(4, 0.6), (8, 0.1), (3, 1.0)])
def test_beta0_is_contrastive_search(tiny, k, alpha):
    s = MagicDecoding(k=k, alpha=alpha, beta=0.0, max_new_tokens=10)
    ids = prompt(tiny)
    expected, _ = direct_search(lm_full_forward(tiny.lm), ids, s, stop=tiny.stop_ids)
    assert len(expected) >= 5  # a run that stops at once would prove little
    assert run_fast(tiny, ids, s) == expected


def test_alpha0_beta0_is_greedy(tiny):
    ids = prompt(tiny, "a dog on")
    s = MagicDecoding(k=8, alpha=0.0, beta=0.0, max_new_tokens=12)
    out = tiny.lm.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=tiny.tokenizer.pad_token_id,
        eos_token_id=tiny.tokenizer.eos_token_id,
    )
    greedy = out[0, len(ids) :].tolist()
    if tiny.tokenizer.eos_token_id in greedy:
        greedy = greedy[: greedy.index(tiny.tokenizer.eos_token_id)]
    assert run_fast(tiny, ids, s) == greedy
    assert tiny.generate(prompt="a dog on", decoding="greedy", max_new_tokens=12).token_ids == greedy


def test_magic_matches_the_direct_rule_with_a_real_clip(tiny, images):
    """beta > 0 with the tiny CLIP: the cached, batched loop equals the per-candidate full recomputation."""
    s = MagicDecoding(k=6, alpha=0.3, beta=2.0, max_new_tokens=8)
    clip = tiny.clip.logits_fn(images[:1])
    ids = prompt(tiny)
    expected, _ = direct_search(
        lm_full_forward(tiny.lm), ids, s, clip=clip, decode=tiny.tokenizer.decode, stop=tiny.stop_ids
    )
    assert run_fast(tiny, ids, s, clip=clip) == expected
    # and it is not contrastive search in disguise: the image changes the choice somewhere in these settings
    no_image, _ = direct_search(lm_full_forward(tiny.lm), ids, dataclasses.replace(s, beta=0.0), stop=tiny.stop_ids)
    steered, _ = direct_search(
        lm_full_forward(tiny.lm),
        ids,
        dataclasses.replace(s, beta=50.0),
        clip=clip,
        decode=tiny.tokenizer.decode,
        stop=tiny.stop_ids,
    )
    assert steered != no_image


def test_a_strongly_preferred_candidate_wins(tiny):
    """A CLIP stub that loves the least likely of the k candidates: with a large beta it is chosen every step."""
    preferred: list[str] = []

    def stub(texts):
        preferred.append(texts[-1])
        logits = torch.zeros(len(texts))
        logits[-1] = 30.0
        return logits

    ids = prompt(tiny)
    s = MagicDecoding(k=5, alpha=0.1, beta=10.0, max_new_tokens=8)
    got = run_fast(tiny, ids, s, clip=stub)
    _, candidates = direct_search(lm_full_forward(tiny.lm), ids, dataclasses.replace(s, beta=0.0), stop=tiny.stop_ids)
    assert len(got) == s.max_new_tokens
    for i in range(len(got)):
        assert tiny.tokenizer.decode(got[: i + 1]) == preferred[i]
    # the stub's favourite is the 5th most likely token, which plain contrastive search does not pick
    assert got != run_fast(tiny, ids, dataclasses.replace(s, beta=0.0))
    assert got[0] == candidates[0][-1]


def test_clip_reads_the_continuation_only_truncated_to_60_tokens(tiny):
    seen: list[list[int]] = []
    texts_seen: list[list[str]] = []

    def decode(ids):
        seen.append(list(ids))
        return tiny.tokenizer.decode(ids)

    def stub(texts):
        texts_seen.append(list(texts))
        return torch.zeros(len(texts))

    ids = prompt(tiny, "a long prompt that CLIP must never see")
    s = MagicDecoding(k=3, alpha=0.5, beta=1.0, max_new_tokens=70, clip_text_max_tokens=60)
    # the stub is flat, so the choice is contrastive search's; its candidates come from the direct reference
    _, candidates = direct_search(lm_full_forward(tiny.lm), ids, dataclasses.replace(s, beta=0.0), stop=tiny.stop_ids)
    got = run_fast(tiny, ids, s, clip=stub, decode=decode)
    assert len(got) == 70
    assert len(seen) == 3 * 70 and len(texts_seen) == 70
    for i in range(70):
        batch = seen[3 * i : 3 * i + 3]
        assert batch == [(got[:i] + [v])[-60:] for v in candidates[i]]
        assert texts_seen[i] == [tiny.tokenizer.decode(b) for b in batch]
    assert max(len(b) for b in seen) == 60 and seen[-1][:59] == got[70 - 60 : 69]
    assert continuation_ids([1, 2, 3], 4, 2) == [3, 4]


def test_clip_text_through_the_model_api(tiny, images, monkeypatch):
    """MagicModel.generate hands CLIP the decoded continuation, never the prompt text."""
    seen: list[list[str]] = []

    def flat(texts):
        seen.append(texts)
        return torch.zeros(len(texts))

    monkeypatch.setattr(tiny.clip, "logits_fn", lambda imgs: flat)
    r = tiny.generate(images[:1], "zebra zebra zebra", k=4, max_new_tokens=6)
    assert len(seen) == len(r.token_ids) + (len(r.token_ids) < 6)
    assert r.prompt == "zebra zebra zebra"
    for i, texts in enumerate(seen[: len(r.token_ids)]):
        assert tiny.tokenizer.decode(r.token_ids[: i + 1]) in texts
        assert not any(t.startswith("zebra zebra") for t in texts)


def test_clip_scores_are_scaled_cosines(tiny, images):
    """f's logits are CLIP's own: logit_scale x cosine of the projected embeddings, as CLIPModel computes them."""
    texts = ["a red square", "a blue dog", "x"]
    logits = tiny.clip.text_logits(tiny.clip.embed_images(images[:1]), texts)
    enc = tiny.clip.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = tiny.clip.processor(images[:1])
    ref = tiny.clip.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(logits, ref.logits_per_text[:, 0], rtol=1e-5, atol=1e-5)
    # the tiny CLIP tokenizer ends texts with EOS, where CLIP pools: different texts, different embeddings
    assert enc["input_ids"][2, 1].item() == tiny.clip.tokenizer.eos_token_id
    assert logits.unique().numel() == 3


def test_decoding_modes(tiny, images):
    base = tiny.config.decoding
    assert magic.resolve_decoding("contrastive", base).beta == 0.0
    greedy = magic.resolve_decoding("greedy", base)
    assert (greedy.k, greedy.alpha, greedy.beta) == (1, 0.0, 0.0)
    assert magic.resolve_decoding("magic", base, k=3, alpha=None) == dataclasses.replace(base, k=3)
    # contrastive and greedy need no image
    assert tiny.generate(decoding="contrastive", max_new_tokens=3).settings.beta == 0.0
    assert tiny.generate(images[:1], decoding="magic", max_new_tokens=3).settings.beta == base.beta


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k \(the number of candidates\) must be an integer >= 1, got 0"),
        ({"alpha": 1.5}, r"alpha .* must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha .* must be in \[0, 1\], got -0.1"),
        ({"beta": -1.0}, r"beta .* must be >= 0"),
    ],
)
def test_bad_settings_are_clear_errors(tiny, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(images[:1], **kwargs)
    with pytest.raises(ConfigError, match=message):
        MagicDecoding(**kwargs)


def test_magic_needs_an_image(tiny):
    with pytest.raises(ValueError, match="needs an image"):
        tiny.generate([], decoding="magic")
    with pytest.raises(ValueError, match="needs an image"):
        magic_search(
            hf_step(tiny.lm),
            hf_step(tiny.lm)(torch.tensor([[5]]), None),
            tiny.config.decoding,
            decode=tiny.tokenizer.decode,
            clip_logits=None,
        )


def test_unknown_decoding_and_non_magic_model(tiny):
    with pytest.raises(ValueError, match="decoding must be one of magic, contrastive, greedy"):
        tiny.generate(decoding="beam")
    with pytest.raises(ValueError, match="not a MAGIC preset"):
        load_magic("tiny-fromage", device="cpu")


def test_load_pipeline_points_magic_presets_to_load_magic():
    from fromage_gill import load_pipeline

    with pytest.raises(ConfigError, match="load_magic"):
        load_pipeline("tiny-magic", device="cpu")


def test_a_model_with_no_clip_text_tower_cannot_use_magic(make_pipeline):
    pipe = make_pipeline("tiny-fromage")
    with pytest.raises(ValueError, match="a model with no CLIP text tower cannot use magic decoding; .*attach_clip"):
        magic.attached_clip(pipe)
    with pytest.raises(ValueError, match="no CLIP text tower"):
        magic.attach_clip(pipe)  # its vision tower is random: it names no full CLIP to load


# ------------------------------------------------------------------------------ presets


MAGIC_PRESETS = [n for n in list_presets() if isinstance(load_config(n), MagicConfig)]


def test_published_settings():
    assert {"magic-mscoco", "magic-flickr30k", "magic-story", "tiny-magic"} <= set(MAGIC_PRESETS)
    want = {
        "magic-mscoco": ("cambridgeltl/magic_mscoco", 45, 0.1, 2.0),
        "magic-flickr30k": ("cambridgeltl/magic_flickr30k", 25, 0.1, 2.0),
        "magic-story": ("cambridgeltl/simctg_rocstories", 5, 0.6, 0.15),
    }
    for name, (lm, k, alpha, beta) in want.items():
        cfg = load_config(name)
        assert (cfg.lm.source, cfg.decoding.k, cfg.decoding.alpha, cfg.decoding.beta) == (lm, k, alpha, beta)
        assert cfg.clip.source == "openai/clip-vit-base-patch32" and cfg.decoding.clip_text_max_tokens == 60
    assert load_config("magic-story").prompt("The Girls") == "The Girls <|endoftext|>"
    assert load_config("magic-mscoco").prompt() == "<-start_of_text->"


@pytest.mark.parametrize("name", MAGIC_PRESETS)
def test_every_magic_preset_builds_and_captions(name, images, tmp_path):
    cfg = load_config(name)
    small = cfg if cfg.is_random else cfg.reduced()
    # the tiny BPE spells start tokens in many pieces: a length counting the prompt is dropped (max_new_tokens stays)
    assert small.decoding == dataclasses.replace(cfg.decoding, max_length=None)
    assert small.prompt_template == cfg.prompt_template and small.is_random
    small.save(tmp_path / "config.json")
    assert load_config(tmp_path) == small
    m = load_magic(small, device="cpu", dtype="fp32")
    r = m.generate(images[:1], "Title", max_new_tokens=4)
    assert r.settings == dataclasses.replace(small.decoding, max_new_tokens=4) and r.prompt == cfg.prompt("Title")
    assert 0 <= len(r.token_ids) <= 4


def test_magic_config_validation(tmp_path):
    data = load_config("tiny-magic").to_dict()
    data["decoding"]["alpha"] = 2
    path = tmp_path / "m.json"
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(ConfigError, match="alpha"):
        load_config(path)
    data["decoding"]["alpha"] = 0.1
    data["clip"] = {"source": "random"}
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(ConfigError, match="clip.config needs"):
        load_config(path)


# ------------------------------------------------------------------------------ on a FROMAGe pipeline


def grounded_full_forward(model, prefix):
    """ids -> (logits, hidden) of the GroundedLM on [prefix embeddings ; ids], recomputed from scratch."""

    def forward(ids):
        emb = torch.cat([prefix, model.embed_tokens(torch.tensor([ids]))], dim=1)
        out = model.forward_lm(emb, logits="all")
        return out.logits[0, -1].float(), out.hidden[0].float()

    return forward


@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_on_a_fromage_pipeline_guided_by_its_images(make_pipeline, images, beta):
    pipe = make_pipeline("tiny-fromage")
    guide = magic.attach_clip(pipe, "tiny-magic")
    assert magic.attached_clip(pipe) is guide
    model = pipe.model
    with torch.no_grad():
        prefix = model.visual_tokens(model.encode_images(model.vision.processor(images[:1])))
        ids = pipe.tokenizer("Q: what is this?\nA:", add_special_tokens=False)["input_ids"]
        out = model.forward_lm(
            torch.cat([prefix, model.embed_tokens(torch.tensor([ids]))], 1), use_cache=True, logits="last"
        )
    start = magic.LMStep(out.logits[:, -1], out.hidden, out.past_key_values)
    s = MagicDecoding(k=5, alpha=0.4, beta=beta, max_new_tokens=8)
    clip = magic.attached_clip(pipe).logits_fn(images[:1]) if beta > 0 else None
    got = list(
        magic_search(
            grounded_step(model),
            start,
            s,
            decode=pipe.tokenizer.decode,
            clip_logits=clip,
            stop_ids=[pipe.tokenizer.eos_token_id],
            vocab_limit=model.n_base,
        )
    )
    expected, _ = direct_search(
        grounded_full_forward(model, prefix),
        ids,
        s,
        clip=guide.logits_fn(images[:1]),
        decode=pipe.tokenizer.decode,
        stop=[pipe.tokenizer.eos_token_id],
        vocab_limit=model.n_base,
    )
    assert got == expected and len(got) > 0
    assert all(t < model.n_base for t in got)  # text tokens only: never [RET]


# ------------------------------------------------------------------------------ the caption command


def test_caption_cli_offline_end_to_end(tmp_path, images, capsys):
    from fromage_gill.cli import main

    paths = []
    for i, img in enumerate(images[:2]):
        paths.append(str(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    assert main(["caption", *paths, "--model", "tiny-magic", "--k", "4", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    m = load_magic("tiny-magic", device="cpu", dtype="fp32")
    for path, line in zip(paths, lines, strict=True):
        assert line.split("\t", 1)[1] == m.generate([path], k=4, max_new_tokens=5).text
    assert main(["caption", paths[0], "--model", "tiny-magic", "--decoding", "greedy", "--max-new-tokens", "5"]) == 0
    assert (
        capsys.readouterr().out.split("\t", 1)[1].rstrip("\n") == m.generate(decoding="greedy", max_new_tokens=5).text
    )
    for bad, message in [
        (["--k", "0"], "k (the number of candidates)"),
        (["--alpha", "1.5"], "alpha"),
        (["--model", "tiny-fromage"], "caption needs a MAGIC preset"),
    ]:
        assert main(["caption", paths[0], "--model", "tiny-magic", *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing.png"), "--model", "tiny-magic"]) == 2
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ as a strategy of the generation engine


def engine_reference(pipe, message, s, guide=None):
    """The direct rule on the exact prompt the engine encodes for ``message`` (visual tokens included)."""
    from fromage_gill.generate.prompt import VisionCache, encode_pieces, normalize_message

    model = pipe.model
    prompt = encode_pieces(
        pipe.tokenizer, normalize_message(message, allow_token_ids=True), pipe.config.n_visual_tokens
    )
    with torch.no_grad():
        prefix = prompt.embed(model, VisionCache(), 0)[None]

    def forward(ids):
        emb = prefix if not ids else torch.cat([prefix, model.embed_tokens(torch.tensor([ids]))], dim=1)
        out = model.forward_lm(emb, logits="all")
        return out.logits[0, -1].float(), out.hidden[0].float()

    images = [m for m in message if hasattr(m, "convert")]  # the PIL images
    clip = guide.logits_fn(images) if guide is not None and s.beta > 0 else None
    got, _ = direct_search(
        forward,
        [],
        s,
        clip=clip,
        decode=lambda ids: pipe.tokenizer.decode(ids, skip_special_tokens=True),
        stop=[pipe.tokenizer.eos_token_id],
        vocab_limit=model.n_base,
    )
    return got


@pytest.mark.parametrize("decoding", ["contrastive", "magic"])
def test_engine_strategy_equals_the_direct_rule(make_pipeline, images, decoding):
    from fromage_gill.generate import GenerationSettings, generate_batch
    from fromage_gill.generate.prompt import TokenIds

    pipe = make_pipeline("tiny-fromage")
    guide = magic.attach_clip(pipe, "tiny-magic")
    ids = pipe.tokenizer("Q: describe it.\nA:", add_special_tokens=False)["input_ids"]
    messages = [[images[0], TokenIds(tuple(ids))], [images[1], TokenIds(tuple(ids))]]
    options = {"k": 5, "alpha": 0.5, "beta": 3.0}
    settings = GenerationSettings(
        decoding=decoding, mode="text", max_new_tokens=8, decoding_options=options, stop_strings=("<never>",)
    )
    outs = generate_batch(pipe, messages, settings)  # two rows decoded together, each guided by its own image
    s = magic.resolve_decoding(decoding, MagicDecoding(max_new_tokens=8, **options))
    for message, out in zip(messages, outs, strict=True):
        assert out.tokens == engine_reference(pipe, message, s, guide)
        assert len(out.tokens) > 0


def test_engine_strategy_errors(make_pipeline, images):
    from fromage_gill.generate import Chat, GenerationSettings

    pipe = make_pipeline("tiny-fromage")
    with pytest.raises(ValueError, match="no CLIP text tower"):
        list(Chat(pipe).send([images[0], "hi"], GenerationSettings(decoding="magic")))
    magic.attach_clip(pipe, "tiny-magic")
    with pytest.raises(ValueError, match="needs an image in the conversation"):
        list(Chat(pipe).send(["hi"], GenerationSettings(decoding="magic")))
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
        list(Chat(pipe).send([images[0], "hi"], GenerationSettings(decoding="magic", decoding_options={"alpha": 2})))
    with pytest.raises(ValueError, match=r"k \(the number of candidates\)"):
        list(Chat(pipe).send(["hi"], GenerationSettings(decoding="contrastive", decoding_options={"k": 0})))
    with pytest.raises(ValueError, match="not magic options"):
        list(Chat(pipe).send([images[0], "hi"], GenerationSettings(decoding="magic", decoding_options={"kk": 2})))
    # contrastive search needs neither CLIP nor an image, and keeps a multi-turn chat going
    chat = Chat(make_pipeline("tiny-fromage"))
    for text in ("hi", "and then?"):
        events = list(chat.send([text], GenerationSettings(decoding="contrastive", max_new_tokens=4)))
        assert events[-1].reason in ("max_new_tokens", "eos", "turn_boundary")
