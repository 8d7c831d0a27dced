"""The research API (fromage_gill.probe) gives exactly what the engine computes: the chat engine's retrieval ranking
and decision, the prompt_embeds it hands Stable Diffusion, the caption states of image_token_states, and the
training layout's log-likelihoods; on a published-layout checkpoint its image embeddings are CLIPImageProcessor's."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fromage_gill as fg
from fromage_gill.generate import (
    Chat,
    GenerationSettings,
    ImageResult,
    TokenIds,
    Turn,
    context_length,
    image_token_states,
)
from fromage_gill.generate.diffusion import GeneratedImages, ImageGenerator
from fromage_gill.generate.prompt import dialogue_pieces, normalize_message
from fromage_gill.layout import Context, Visual, layout
from fromage_gill.retrieve import ImageIndex

FORCE_IMAGE = dict(image_logit_bias=float("inf"), max_images=1, max_new_tokens=3, stop_at_eos=False, seed=0)


def _index(pipe, imgs, tmp_path):
    emb = fg.embed_images(pipe, imgs).embeddings
    records = []
    for i, img in enumerate(imgs):
        img.save(tmp_path / f"img{i}.png")
        records.append({"path": str(tmp_path / f"img{i}.png"), "caption": f"picture {i}"})
    return ImageIndex.from_embeddings(emb, records, pipe.model.retrieval_fingerprint())


def _chat_prompt(pipe, message):
    """The pieces the chat engine lays out for a first user message (its dialogue template)."""
    turn = Turn("user", normalize_message(message))
    return dialogue_pieces([turn], pipe.config.dialogue, pipe.model.image_token_ids)


def test_image_embeddings_are_the_index_builders_and_batching_changes_nothing(tiny_gill, images):
    m = tiny_gill.model
    got = fg.embed_images(tiny_gill, images, batch_size=3)
    with torch.no_grad():  # what retrieve/build.py stores for each image
        feats = m.encode_images(m.vision.processor(images))
        want = m.image_embedding(feats)
    torch.testing.assert_close(got.embeddings, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.features, feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.embeddings.norm(dim=-1), torch.ones(len(images)))


@pytest.mark.parametrize("preset", ["tiny_fromage", "tiny_gill"])
def test_prompt_embedding_ranks_images_as_the_chat_engine_retrieves(preset, request, images, tmp_path):
    pipe = request.getfixturevalue(preset)
    pipe = dataclasses.replace(pipe, index=_index(pipe, images, tmp_path))
    message = [images[1], "show me a picture like this one"]
    events = list(Chat(pipe).send(message, GenerationSettings(mode="retrieve", **FORCE_IMAGE)))
    shown = [e for e in events if isinstance(e, ImageResult)]
    assert len(shown) == 1
    q = fg.embed_prompts(pipe, [_chat_prompt(pipe, message)])
    scores = q.scores(fg.embed_images(pipe, images))[0]
    assert int(scores.argmax()) == shown[0].index_id
    assert abs(float(scores.max()) - shown[0].score) < 1e-5
    if pipe.model.decision is not None:  # the chat's decision is the API's at the same [IMG0]
        probs = fg.decision_probabilities(pipe, [_chat_prompt(pipe, message)]).probabilities[0]
        np.testing.assert_allclose(probs.numpy(), shown[0].decision, atol=1e-5)


def test_text_embeddings_are_image_token_states_and_equal_text_only_prompts(tiny_gill):
    texts = ["a red square", "two green triangles on a table", "x"]
    got = fg.embed_texts(tiny_gill, texts, batch_size=2)
    with torch.no_grad():
        want = tiny_gill.model.text_embedding(image_token_states(tiny_gill, texts)[:, 0])
    torch.testing.assert_close(got.embeddings, want, rtol=0, atol=1e-6)
    prompts = fg.embed_prompts(tiny_gill, [[t] for t in texts], batch_size=2)  # right-padded batch of prompts
    torch.testing.assert_close(prompts.embeddings, want, rtol=0, atol=1e-5)
    assert prompts.lengths == got.lengths
    assert got.lengths[2] == 1 + len(tiny_gill.tokenizer("x", add_special_tokens=False).input_ids) + 8


def test_generation_embeddings_are_the_prompt_embeds_the_engine_gives_stable_diffusion(make_pipeline, images):
    pipe = make_pipeline("tiny-gill")
    seen = []

    class Recording(ImageGenerator):  # what the engine hands Stable Diffusion, without running it
        def __call__(self, prompt_embeds, **kwargs):
            seen.append(prompt_embeds.detach().clone())
            return GeneratedImages([Image.new("RGB", (8, 8))], [False])

    pipe.image_generator = Recording(pipe.diffusion)
    message = ["draw something like", images[2]]
    list(Chat(pipe).send(message, GenerationSettings(mode="generate", num_inference_steps=1, **FORCE_IMAGE)))
    got = fg.generation_embeddings(pipe, [_chat_prompt(pipe, message), "a plain prompt"])
    assert got.embeddings.shape == (2, 77, 32)  # num_queries x out_dim of tiny-gill's mapper
    torch.testing.assert_close(got.embeddings[:1], seen[0].float(), rtol=0, atol=1e-5)
    alone = fg.generation_embeddings(pipe, ["a plain prompt"]).embeddings
    torch.testing.assert_close(got.embeddings[1:], alone, rtol=0, atol=1e-5)  # batching changes nothing


def test_candidate_scores_are_the_training_layouts_log_likelihood(tiny_gill, images):
    pipe, m, tok = tiny_gill, tiny_gill.model, tiny_gill.tokenizer
    context = [images[0], "Q: what is it?\nA: "]
    candidates = ["a square", "two red triangles and a circle", "no"]
    got = fg.score_candidates(pipe, context, candidates, batch_size=2)
    # Reference: GroundedLM.forward on rows laid out by layout.layout, the candidate as the only targets.
    ctx = tuple([tok.bos_token_id, *tok("Q: what is it?\nA: ", add_special_tokens=False).input_ids])
    want = []
    with torch.no_grad():
        feats = m.encode_images(m.vision.processor([images[0]]))
        for c in candidates:
            ids = tok(c, add_special_tokens=False).input_ids
            lay = layout([[Visual(0), Context(ctx), *ids]], n_visual=4, pad_id=1, ignore_ids=frozenset())
            out = m(lay.input_ids, lay.attention_mask, features=feats, visual_slot=lay.visual_slot)
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], lay.labels[0, 1:], reduction="sum")
            want.append(-float(loss))
            assert int((lay.labels != -100).sum()) == len(ids)
    np.testing.assert_allclose(got.summed.numpy(), want, rtol=1e-5, atol=1e-4)
    n = [len(tok(c, add_special_tokens=False).input_ids) for c in candidates]
    assert got.n_tokens.tolist() == n
    np.testing.assert_allclose(got.mean.numpy(), np.array(want) / n, rtol=1e-5, atol=1e-4)
    assert got.ranking().tolist() == list(np.argsort(-np.array(want), kind="stable"))


def test_token_ids_and_bos_false_place_bos_where_the_caller_says(tiny_fromage):
    tok = tiny_fromage.tokenizer
    ids = tuple(tok("a red square", add_special_tokens=False).input_ids)
    explicit = fg.embed_prompts(tiny_fromage, [[TokenIds((tok.bos_token_id, *ids))]], bos=False)
    plain = fg.embed_prompts(tiny_fromage, ["a red square"])
    torch.testing.assert_close(explicit.embeddings, plain.embeddings, rtol=0, atol=1e-6)


def test_bad_inputs_name_the_problem(tiny_fromage, tiny_gill):
    with pytest.raises(ValueError, match="images is empty"):
        fg.embed_images(tiny_fromage, [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fg.embed_texts(tiny_fromage, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="texts must be a list of str"):
        fg.embed_texts(tiny_fromage, "a caption")
    with pytest.raises(ValueError, match="no decision head"):
        fg.decision_probabilities(tiny_fromage, ["a"])
    with pytest.raises(ValueError, match="has no GILLMapper"):
        fg.generation_embeddings(tiny_fromage, ["a"])
    with pytest.raises(ValueError, match="tokenize to nothing"):
        fg.score_candidates(tiny_gill, ["Q: hi\nA:"], ["ok", ""])
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        fg.embed_prompts(tiny_gill, [])
    with pytest.raises(ValueError, match="prompts\\[1\\] item 0 is a int"):
        fg.embed_prompts(tiny_gill, ["ok", [3]])
    with pytest.raises(ValueError, match="by must be"):
        fg.score_candidates(tiny_gill, ["Q: hi\nA:"], ["ok"]).ranking(by="max")


def test_one_image_or_none_is_read_or_refused_by_name(tiny_fromage, images):
    with pytest.raises(ValueError, match="images is None: give an image"):
        fg.embed_images(tiny_fromage, None)
    with pytest.raises(ValueError, match="images is a int; give an image"):
        fg.embed_images(tiny_fromage, 3)
    one = fg.embed_images(tiny_fromage, images[1])  # a bare image is a batch of one
    listed = fg.embed_images(tiny_fromage, [images[1]])
    assert one.embeddings.shape == (1, tiny_fromage.config.retrieval_dim)
    torch.testing.assert_close(one.embeddings, listed.embeddings, rtol=0, atol=0)


def test_a_text_longer_than_the_lm_reads_is_refused_with_the_limit(tiny_fromage):
    limit = context_length(tiny_fromage)
    long = " ".join(["red"] * 10_000)
    with pytest.raises(ValueError, match=rf"texts\[1\] is \d+ tokens .* reads at most {limit}; shorten it"):
        fg.embed_texts(tiny_fromage, ["a red square", long])
    with pytest.raises(ValueError, match=rf"prompts\[0\] is \d+ tokens .* at most {limit}"):
        fg.embed_prompts(tiny_fromage, [long])
    with pytest.raises(ValueError, match=rf"context \+ candidates\[0\] is \d+ tokens .* at most {limit}"):
        fg.score_candidates(tiny_fromage, "Q: what is it?\nA:", [long])
    fits = " ".join(["red"] * (limit // 4))  # a long text that fits still embeds
    assert torch.isfinite(fg.embed_texts(tiny_fromage, [fits]).embeddings).all()


# ---------------------------------------------------------------------------------------------- published layout


def _published_fromage(directory, d=64, v=32, r=16):
    """A FROMAGe checkpoint in the published layout (FORMATS.md key names) at tiny-fromage's widths."""
    g = torch.Generator().manual_seed(7)
    state = {
        "model.visual_embeddings.weight": torch.randn(d, v, generator=g),
        "model.visual_embeddings.bias": torch.randn(d, generator=g),
        "model.visual_fc.weight": torch.randn(r, v, generator=g),
        "model.visual_fc.bias": torch.randn(r, generator=g),
        "model.text_hidden_fcs.0.0.weight": torch.randn(r, d, generator=g),
        "model.text_hidden_fcs.0.0.bias": torch.randn(r, generator=g),
        "model.logit_scale": torch.tensor(2.0),
        "ret_input_embeddings.weight": torch.randn(1, d, generator=g),
    }
    directory.mkdir(parents=True)
    torch.save({"state_dict": state}, directory / "pretrained_ckpt.pth.tar")
    args = {"opt_version": "facebook/opt-6.7b", "n_visual_tokens": 1, "shared_emb_dim": r, "text_emb_layers": [-1]}
    (directory / "model_args.json").write_text(json.dumps(args))
    return state


def test_published_checkpoint_image_embeddings_equal_clip_image_processors_on_a_4_3_photo(tmp_path):
    # Needs images.ImageProcessor to truncate the resized long side as CLIP does (issue 19, item 1): a 160x120
    # photo resized to a 32-px short side is 42 px wide in CLIPImageProcessor, 43 if rounded. transformers 5's
    # CLIPImageProcessor resizes with torchvision (antialiased, ~1e-2 off PIL); the PIL one is what the published
    # code ran (transformers 4's CLIPImageProcessor), so that is the reference.
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor

    from fromage_gill.images import CLIP_MEAN, CLIP_STD

    state = _published_fromage(tmp_path / "fromage")
    pipe = fg.load_pipeline(tmp_path / "fromage", preset="tiny-fromage", device="cpu", dtype="fp32")
    assert torch.equal(pipe.model.visual_fc.weight, state["model.visual_fc.weight"])
    size = pipe.image_processor.size
    clip = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=Image.BICUBIC,
    )
    g = np.random.default_rng(0)
    photo = Image.fromarray(g.integers(0, 256, (120, 160, 3), dtype=np.uint8), "RGB")  # 160x120: 4:3
    pixels = torch.from_numpy(clip(images=[photo], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        feats = pipe.model.encode_images(pixels)
        want = torch.nn.functional.normalize(feats @ state["model.visual_fc.weight"].T + state["model.visual_fc.bias"])
    got = fg.embed_images(pipe, [photo])
    torch.testing.assert_close(got.features, feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.embeddings, want, rtol=0, atol=1e-6)
