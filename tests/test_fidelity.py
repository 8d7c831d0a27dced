"""Fidelity to the published code: each test reproduces a documented behaviour of the authors' FROMAGe, GILL or
MAGIC code (docs/fidelity.md lists them), computed here from the reference's rule, not from the project's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill.images import CLIP_MEAN, CLIP_STD, ImageProcessor

SIZES = [(640, 480), (480, 640), (500, 375), (427, 640), (640, 427), (160, 120), (120, 160), (300, 200), (224, 224)]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    # Noise: a crop off by one pixel, or one grey level of resampling, shows as a large difference
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _clip_reference(size: int = 224):
    """transformers' PIL-backed CLIP processor with CLIP ViT-L/14's settings, built offline (what the published
    code's CLIPFeatureExtractor was; transformers 5 names it CLIPImageProcessorPil)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# ------------------------------------------------------------------------------ image preprocessing


@pytest.mark.parametrize("w,h", SIZES)
def test_pixels_equal_clips_image_processor(w, h):
    img = _noise(w, h)
    ref = _clip_reference()(images=[img], return_tensors="pt")["pixel_values"]
    ours = ImageProcessor()([img])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_the_long_side_is_truncated():
    # 160x120 -> 298.67 x 224: CLIP makes it 298 wide (the crop starts at column 37); rounding made it 299 (col 37
    # of 299 is another pixel). The crop of a 298-wide bicubic resize is what the processor must give.
    img = _noise(160, 120, seed=3)
    resized = img.resize((298, 224), Image.BICUBIC).crop((37, 0, 37 + 224, 224))
    x = np.asarray(resized, dtype=np.float32) / 255.0
    want = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    ours = ImageProcessor()([img])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - want).max() <= 1e-6


def test_transformers_torchvision_processor_differs_only_by_resampling():
    """transformers 5's default CLIPImageProcessor resizes with torchvision, not PIL: same geometry (a shifted crop
    would differ by > 1 in normalised units on noise), at most two grey levels apart."""
    from transformers import CLIPImageProcessor

    tv = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    for w, h in SIZES:
        img = _noise(w, h)
        diff = (tv(images=[img], return_tensors="pt")["pixel_values"] - ImageProcessor()([img])).abs().max().item()
        assert diff <= 2.5 / 255 / min(CLIP_STD), (w, h, diff)


def test_squash_resizes_the_whole_image_as_the_demos_did():
    img = _noise(640, 480, seed=1)
    want = ImageProcessor()([img.resize((224, 224), Image.BICUBIC)])  # the demo's upload, then CLIP (a no-op crop)
    assert (ImageProcessor(resize="squash")([img]) - want).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="resize='stretch'.*'crop'.*'squash'"):
        ImageProcessor(resize="stretch")


def test_magic_clip_uses_the_same_processing():
    from fromage_gill.config import load_config
    from fromage_gill.magic.clip import load_clip

    guide = load_clip(load_config("tiny-magic").clip, device="cpu", dtype=torch.float32)
    size = guide.processor.size
    img = _noise(640, 480, seed=2)
    ref = _clip_reference(size)(images=[img], return_tensors="pt")["pixel_values"]
    assert (guide.processor([img]) - ref).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------ the published presets' defaults

# The published demos' controls, as read from their code (kohjingyu/gill demo/app_gradio.py, kohjingyu/fromage
# demo/app.py): the sliders' starting values and what generate_for_prompt passes on. "Max # of words" is the
# reference's decode-step count (models.generate's max_len: one step per token, the r image tokens of [IMG0] in one
# step), which is what max_new_tokens counts; top_p is 0.95 "if temperature != 0.0", else 1.0 (greedy either way).
DEMOS = {
    "gill": {"ret_scale_factor": 1.3, "max_images": 1, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.95},
    "fromage": {"ret_scale_factor": 1.0, "max_images": 2, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.95},
}


@pytest.mark.parametrize("preset,demo", [("gill", "gill"), ("fromage", "fromage"), ("fromage-vis4", "fromage")])
def test_published_presets_start_from_their_demos_settings(preset, demo):
    from fromage_gill.config import load_config
    from fromage_gill.settings import GenerationSettings

    s = GenerationSettings.for_model(load_config(preset))
    assert {k: getattr(s, k) for k in DEMOS[demo]} == DEMOS[demo]
    assert (s.guidance_scale, s.num_inference_steps) == (7.5, 50)  # GILL's generate_for_images_and_texts
    assert (s.answer_style, s.history_layout) == ("full", "exact")  # the project's own; "published" is opt-in


def test_the_cli_sets_the_published_knobs(monkeypatch, capsys):
    from fromage_gill.cli import main
    from fromage_gill.generate import Chat

    seen = []

    def send(self, message, settings=None):
        seen.append(settings)
        return iter(())

    monkeypatch.setattr(Chat, "send", send)
    args = ["generate", "--model", "tiny-gill", "--text", "hi", "--mode", "text", "--json"]
    knobs = ["--ret-scale-factor", "1.3", "--gen-scale-factor", "1.2", "--min-word-tokens", "3"]
    assert main([*args, *knobs, "--answer-style", "published"]) == 0
    s = seen[0]
    assert (s.ret_scale_factor, s.gen_scale_factor, s.min_word_tokens, s.answer_style) == (1.3, 1.2, 3, "published")
    assert main([*args, "--ret-scale-factor", "-1"]) == 2  # checked before the model loads
    assert "ret_scale_factor=-1.0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the published answer cut


@pytest.mark.parametrize(
    "text,want",
    [
        (" A dog. It runs.", " A dog."),  # the first full stop
        (" A dog", " A dog"),  # neither: kept whole
        ("\n\n A dog. It", " A dog."),  # newlines stripped at both ends first
        (" A dog\nQ: more. x", " A dog\n"),  # a newline first: kept, up to and including it
        ("", ""),
    ],
)
def test_truncate_caption_is_the_references_rule(text, want):
    from fromage_gill.generate.stream import truncate_caption

    assert truncate_caption(text) == want


def _scripted(monkeypatch):
    """A decoding strategy playing decoding_options['script'] (token ids; None = greedy), then greedy."""
    from fromage_gill import settings
    from fromage_gill.generate import decoding

    def factory(pipeline, s, images):
        script, steps = s.decoding_options["script"], []

        def choose(state):  # one call per decoding step (one row)
            out = state.logits.argmax(-1)
            step = len(steps)
            steps.append(step)
            if step < len(script) and script[step] is not None:
                out[0] = script[step]
            return out

        return choose

    monkeypatch.setattr(settings, "DECODINGS", (*settings.DECODINGS, "fidelity-script"))
    monkeypatch.setitem(decoding.STRATEGIES, "fidelity-script", factory)


def _ids(pipe, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def _turn(pipe, message, script, **kw):
    from fromage_gill.generate import Chat, GenerationSettings, TextDelta

    chat = Chat(pipe)
    s = GenerationSettings(decoding="fidelity-script", decoding_options={"script": script}, stop_at_eos=False, **kw)
    events = list(chat.send(message, s))
    return chat, "".join(e.text for e in events if isinstance(e, TextDelta)), events


@pytest.mark.parametrize("style,want", [("full", " a cat. It sits"), ("published", " a cat.")])
def test_published_answer_style_cuts_at_the_first_full_stop(tiny_fromage, monkeypatch, style, want):
    _scripted(monkeypatch)
    script = _ids(tiny_fromage, " a cat. It sits\nQ: more")
    chat, shown, _ = _turn(tiny_fromage, ["hi"], script, mode="text", max_new_tokens=20, answer_style=style)
    assert shown == want and chat.history[-1].text == want
    assert tiny_fromage.tokenizer.decode(chat.history[-1].tokens) == want  # the history keeps what was shown


def test_published_answer_style_cleans_up_spaces_as_old_transformers_decoded(tiny_fromage, monkeypatch):
    _scripted(monkeypatch)  # transformers 4.21 / 4.30 (the published code's pins) decoded " ." as "."
    script = _ids(tiny_fromage, " a cat , it is . more")
    for style, want in [("full", " a cat , it is . more"), ("published", " a cat, it is.")]:
        _, shown, _ = _turn(tiny_fromage, ["hi"], script, mode="text", max_new_tokens=len(script), answer_style=style)
        assert shown == want


def test_published_answer_style_skips_leading_newlines_and_stops_at_the_next(tiny_fromage, monkeypatch):
    _scripted(monkeypatch)
    script = _ids(tiny_fromage, "\n a dog runs\n and more words here")
    chat, shown, events = _turn(tiny_fromage, ["hi"], script, mode="text", max_new_tokens=30, answer_style="published")
    assert shown == " a dog runs"  # strip("\n"), then the reference's token cut at the next newline
    assert events[-1].reason == "turn_boundary"


@pytest.fixture
def fromage_with_index(tiny_fromage, images, tmp_path):
    import dataclasses

    from fromage_gill.retrieve import ImageIndex

    m = tiny_fromage.model
    with torch.no_grad():
        emb = m.image_embedding(m.encode_images(m.vision.processor(images)))
    records = []
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
        records.append({"path": str(tmp_path / f"{i}.png"), "url": None, "caption": f"picture {i}"})
    return dataclasses.replace(tiny_fromage, index=ImageIndex.from_embeddings(emb, records, m.retrieval_fingerprint()))


def test_published_answer_style_with_images(fromage_with_index, monkeypatch):
    from fromage_gill.generate import ImageResult
    from fromage_gill.generate.prompt import ImageSegment

    pipe = fromage_with_index
    _scripted(monkeypatch)
    ret = pipe.model.image_token_ids[0]
    script = [*_ids(pipe, " a cat. It is"), ret, *_ids(pipe, " so. b"), ret, *_ids(pipe, " after the last")]
    chat, shown, events = _turn(pipe, ["hi"], script, mode="retrieve", max_new_tokens=30, answer_style="published")
    segs = chat.history[-1].segments
    assert [s if isinstance(s, str) else "IMG" for s in segs] == [" a cat.", "IMG", " so.", "IMG"]
    assert shown == " a cat. so." and sum(isinstance(e, ImageResult) for e in events) == 2
    assert events[-1].reason == "image"  # max_images reached: everything after would be dropped
    assert isinstance(segs[-1], ImageSegment)
    # the text after the last image is dropped even when more images were allowed
    chat, shown, events = _turn(
        pipe, ["hi"], script[: script.index(ret, 6) - 1], mode="retrieve", max_new_tokens=9, answer_style="published"
    )
    assert shown == " a cat." and [isinstance(s, str) for s in chat.history[-1].segments] == [True, False]


# ------------------------------------------------------------------------------ the published history layout


def _reference_prompt(pipe, first_image_key, answer_text: str) -> list:
    """The second-turn prompt as the demos built it: [image, "", "Q: hi\\nA:"] then the answer string
    " ".join(text outputs) + "\\n" and "Q: more\\nA:", every string tokenized alone, BOS with the first string only."""
    tok = pipe.tokenizer
    strings = ["Q: hi\nA:", answer_text + "\n", "Q: more\nA:"]
    ids = [tok.bos_token_id] + [t for s in strings for t in tok(s, add_special_tokens=False).input_ids]
    return [(first_image_key, j) for j in range(pipe.config.n_visual_tokens)] + ids


@pytest.mark.parametrize("preset", ["tiny_fromage", "tiny_gill"])
def test_published_history_layout_is_the_demos(preset, request, images):
    from fromage_gill.generate import Chat, GenerationSettings
    from fromage_gill.generate.prompt import ImageSegment, Turn

    pipe = request.getfixturevalue(preset)
    chat = Chat(pipe)
    picture = ImageSegment(images[0])
    exact_answer = _ids(pipe, " a cat. It sits") + list(pipe.model.image_token_ids) + _ids(pipe, " there.")
    answer = Turn("assistant", [" a cat. It sits", ImageSegment(images[1], "retrieved"), " there."], exact_answer)
    turns = [Turn("user", [picture, "hi"]), answer, Turn("user", ["more"])]

    published = chat._plan(turns, GenerationSettings(history_layout="published"))[0]
    # the image tokens as text after a space: " [RET]" (FROMAGe), " [IMG0][IMG1]...[IMG7]" (GILL)
    want = _reference_prompt(pipe, picture.key, " a cat. " + "".join(pipe.config.image_tokens))
    assert published.keys == want
    exact = chat._plan(turns, GenerationSettings())[0]
    assert exact.keys[: len(exact.keys) - len(_ids(pipe, "\nQ: more\nA:"))][-len(exact_answer) :] == exact_answer
    assert len(exact) != len(published)

    # an answer without images is its cut text; with answer_style "full" the cut is applied here too
    plain = Turn("assistant", [" a dog. It runs"], tuple(_ids(pipe, " a dog. It runs")))
    got = chat._plan([turns[0], plain, turns[2]], GenerationSettings(history_layout="published"))[0]
    assert got.keys == _reference_prompt(pipe, picture.key, " a dog.")


def test_published_history_layout_across_turns_keeps_cache_parity(tiny_gill, monkeypatch):
    """A later turn reuses the KV cache only up to where the re-tokenized history differs: the answer equals a
    fresh chat's, which recomputes everything."""
    from fromage_gill.generate import Chat, GenerationSettings, TextDelta

    s = GenerationSettings(mode="text", max_new_tokens=6, answer_style="published", history_layout="published")
    chat = Chat(tiny_gill)
    list(chat.send(["hi"], s))
    second = "".join(e.text for e in chat.send(["more"], s) if isinstance(e, TextDelta))
    fresh = Chat(tiny_gill)
    fresh.history = chat.history[:2]
    again = "".join(e.text for e in fresh.send(["more"], s) if isinstance(e, TextDelta))
    assert second == again


# ------------------------------------------------------------------------------ MAGIC


@pytest.fixture(scope="module")
def tiny_magic():
    from fromage_gill.magic import load_magic

    return load_magic("tiny-magic", device="cpu", dtype="fp32")


@pytest.mark.parametrize(
    "text,want",
    [
        ("A. B. C. D. E. F. G.", "A. B. C. D. E."),  # more than 5 sentences: the first 5, with their full stop
        ("A. B. C. D. E.", "A. B. C. D. E."),  # 6 pieces (the last empty): still "more than 5"
        ("A. B. C. D. E", "A. B. C. D. E"),
        ("He ran. She sat.", "He ran. She sat"),  # 5 or fewer: the final full stop is dropped, as the reference
        ("no stop at all", "no stop at all"),
    ],
)
def test_story_cut_is_the_references_rule(text, want):
    from fromage_gill.magic.model import story_cut

    assert story_cut(text, 5) == want


def test_story_length_counts_the_title_as_the_reference(tiny_magic):
    from fromage_gill.config import load_config

    story = load_config("magic-story")
    assert (story.decoding.max_length, story.story_sentences) == (100, 5)  # magic.sh: --decoding_len 100
    assert tiny_magic.budget(story.decoding, 7).max_new_tokens == 93  # a 7-token "title <|endoftext|>" prompt
    assert load_config("magic-mscoco").decoding.max_length == 16  # mscoco_magic.sh, the start token included
    assert load_config("magic-flickr30k").decoding.max_length == 20
    with pytest.raises(ValueError, match="max_length 5 counts the prompt, which is 7 tokens"):
        tiny_magic.budget(story.decoding, 7, max_length=5)


def test_max_length_bounds_the_continuation(tiny_magic, images):
    n_prompt = tiny_magic.prompt_ids("a title").shape[1]
    r = tiny_magic.generate(images[:1], "a title", max_new_tokens=50, max_length=n_prompt + 3)
    assert r.settings.max_new_tokens == 3 and len(r.steps) <= 3
    assert len(r.token_ids) == 3 or r.steps[-1].token in tiny_magic.stop_ids


def test_story_text_is_the_continuation_cut_to_five_sentences(tiny_magic):
    import dataclasses

    from fromage_gill.config import load_config

    story = dataclasses.replace(tiny_magic, config=load_config("magic-story").reduced())
    ids = tiny_magic.tokenizer(" the dog ran. a cat sat. the sun. a bird. the end. more text.").input_ids
    assert story.text(ids) == "the dog ran. a cat sat. the sun. a bird. the end."
    assert story.text(tiny_magic.tokenizer(" the dog ran. a cat sat.").input_ids) == "the dog ran. a cat sat"


def test_the_start_token_never_appears_in_a_caption(tiny_magic):
    import copy
    import dataclasses

    tok = copy.deepcopy(tiny_magic.tokenizer)
    spelled = tok("a<-start_of_text-> dog").input_ids  # no such token yet: spelled by ordinary pieces
    assert dataclasses.replace(tiny_magic, tokenizer=tok).text(spelled) == "a dog"
    tok.add_tokens(["<-start_of_text->"])  # the published caption LMs' own token
    start = tok.convert_tokens_to_ids("<-start_of_text->")
    ids = [*tok("a").input_ids, start, *tok(" dog").input_ids, start]
    assert dataclasses.replace(tiny_magic, tokenizer=tok).text(ids) == "a dog"


def test_magic_result_has_each_steps_scores(tiny_magic, images):
    r = tiny_magic.generate(images[:1], "a", max_new_tokens=6)
    s = r.settings
    assert r.steps and [st.token for st in r.steps][: len(r.token_ids)] == r.token_ids
    for st in r.steps:
        assert len(st.candidates) == len(st.scores) == min(s.k, tiny_magic.lm.config.vocab_size)
        want = [
            (1 - s.alpha) * p - s.alpha * pen + s.beta * f
            for p, pen, f in zip(st.probs, st.penalties, st.clip, strict=True)
        ]
        assert st.scores == pytest.approx(want, abs=1e-6)
        assert st.token == st.candidates[int(np.argmax(st.scores))]
        assert sum(st.clip) == pytest.approx(1.0, abs=1e-5)


def test_magic_loads_in_fp32_and_warns_for_lower_precision(caplog):
    import logging

    from fromage_gill.magic import load_magic

    assert load_magic("tiny-magic", device="cpu").dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="fromage_gill.magic.model"):
        assert load_magic("tiny-magic", device="cpu", dtype="bf16").dtype == torch.bfloat16
    assert "use dtype fp32 (--dtype fp32) to reproduce" in caplog.text


def test_caption_cli_max_length(tiny_magic, images, tmp_path, capsys):
    from fromage_gill.cli import main

    path = str(tmp_path / "a.png")
    images[0].save(path)
    n_prompt = tiny_magic.prompt_ids("").shape[1]
    assert main(["caption", path, "--model", "tiny-magic", "--k", "4", "--max-length", str(n_prompt + 2)]) == 0
    text = capsys.readouterr().out.split("\t", 1)[1].rstrip("\n")
    assert text == tiny_magic.generate([path], k=4, max_length=n_prompt + 2).text
    assert main(["caption", path, "--model", "tiny-magic", "--max-length", "0"]) == 2
    assert "--max-length 0: must be an integer >= 1" in capsys.readouterr().err
