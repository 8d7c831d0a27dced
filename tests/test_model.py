import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from fromage_gill.config import load_config
from fromage_gill.pipeline import build_pipeline


def _prompt(pipe, images, text="A picture of a dog"):
    """[BOS] [visual tokens of image 0] text [image token 0]: the FROMAGe/GILL training layout."""
    m = pipe.model
    ids = torch.tensor(
        [
            [pipe.tokenizer.bos_token_id]
            + pipe.tokenizer(text, add_special_tokens=False).input_ids
            + [m.image_token_ids[0]]
        ]
    )
    feats = m.encode_images(pipe.image_processor(images[:1]))
    embeds = torch.cat([m.embed_tokens(ids[:, :1]), m.visual_tokens(feats), m.embed_tokens(ids[:, 1:])], dim=1)
    return ids, feats, embeds


def test_new_token_logits_are_hidden_times_new_rows_for_a_tied_lm(tiny_gill, images):
    m = tiny_gill.model
    assert m.tied
    _, _, embeds = _prompt(tiny_gill, images)
    out = m.forward_lm(embeds)
    expected = out.hidden @ m.image_token_embeddings.T
    torch.testing.assert_close(out.logits[..., m.n_base :], expected)
    # Real tokens keep exactly the LM's own logits.
    ref = m.lm(inputs_embeds=embeds).logits[..., : m.n_base]
    torch.testing.assert_close(out.logits[..., : m.n_base], ref)
    assert out.logits.shape[-1] == m.vocab_size


def test_decoding_with_the_cache_matches_a_full_forward_without_deprecation_warnings(tiny_gill, images, caplog):
    # transformers 5.24 renamed the LM's cache argument (and output) to `cache`; the old name still works there
    # but warns at every call and goes in 5.40, so the model passes it by the name the installed LM takes.
    m = tiny_gill.model
    _, _, embeds = _prompt(tiny_gill, images)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        first = m.forward_lm(embeds[:, :-1], use_cache=True, logits="last")
        step = m.forward_lm(embeds[:, -1:], past_key_values=first.past_key_values, use_cache=True, logits="last")
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert "past_key_values" not in caplog.text
    assert first.past_key_values.get_seq_length() == embeds.shape[1]  # the cache was extended in place
    torch.testing.assert_close(step.logits[:, -1], m.forward_lm(embeds).logits[:, -1], atol=1e-5, rtol=1e-4)


def test_embed_tokens_uses_lm_rows_for_text_and_own_rows_for_image_tokens(tiny_fromage):
    m = tiny_fromage.model
    ids = torch.tensor([[5, 17, m.image_token_ids[0], 3]])
    e = m.embed_tokens(ids)
    torch.testing.assert_close(e[0, [0, 1, 3]], m.lm.get_input_embeddings().weight[[5, 17, 3]])
    torch.testing.assert_close(e[0, 2], m.image_token_embeddings[0])
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        m.embed_tokens(torch.tensor([[m.vocab_size]]))


def test_an_optimizer_step_changes_only_the_trained_layers(make_pipeline, images):
    pipe = make_pipeline("tiny-gill")
    m = pipe.model.train()
    frozen_before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    frozen_before.update({f"vision.{k}": v.clone() for k, v in m.vision.state_dict().items()})
    trained_before = {k: v.clone() for k, v in m.trained_state_dict().items()}

    ids, feats, embeds = _prompt(pipe, images)
    out = m.forward_lm(embeds)
    # Captioning + image-token cross-entropy, contrastive loss, and the mapper / decision heads, so every
    # trained layer receives a gradient.
    targets = ids[:, 1:]
    caption_logits = out.logits[:, 1 + m.config.n_visual_tokens - 1 : -1]
    loss = F.cross_entropy(caption_logits.reshape(-1, m.vocab_size), targets.reshape(-1))
    h_img = out.hidden[:, -1]
    loss = loss + m.retrieval_logits(m.text_embedding(h_img), m.image_embedding(feats)).sum() * 0.1
    loss = loss + m.map_to_diffusion(out.hidden[:, -8:]).pow(2).mean() + m.decide(h_img).log()[:, 0].sum()
    opt = torch.optim.AdamW(m.trained_parameters().values(), lr=1e-2, weight_decay=0.1)
    loss.backward()
    opt.step()

    after = {k: v for k, v in m.lm.state_dict().items()}
    after.update({f"vision.{k}": v for k, v in m.vision.state_dict().items()})
    for k, v in frozen_before.items():
        assert torch.equal(v, after[k]), f"frozen tensor {k} changed"
    changed = [k for k, v in m.trained_state_dict().items() if not torch.equal(v, trained_before[k])]
    assert sorted(changed) == sorted(trained_before), "every trained layer should have moved"
    assert not m.lm.training and not m.vision.training, "frozen parts stay in eval mode (no dropout)"


def test_untied_lm_gets_its_own_output_rows(images):
    cfg = load_config("tiny-fromage")
    llama = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    cfg = dataclasses.replace(cfg, name="tiny-llama-fromage", lm=dataclasses.replace(cfg.lm, config=llama))
    pipe = build_pipeline(cfg, device=torch.device("cpu"), dtype=torch.float32)
    m = pipe.model
    assert not m.tied and m.image_token_output is not None
    _, _, embeds = _prompt(pipe, images)
    out = m.forward_lm(embeds)
    torch.testing.assert_close(out.logits[..., m.n_base :], out.hidden @ m.image_token_output.T)
    torch.testing.assert_close(out.logits[..., : m.n_base], m.lm(inputs_embeds=embeds).logits[..., : m.n_base])
    assert "image_token_output" in m.trained_parameters()


def test_mapper_and_decision_match_a_direct_computation(tiny_gill):
    m = tiny_gill.model
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 8, m.hidden_size, generator=g)
    tokens = m.image_token_embeddings.unsqueeze(0).expand(2, -1, -1)
    x = m.mapper.fc(hidden + tokens)
    x = m.mapper.tfm(x, m.mapper.query_embs.repeat(2, 1, 1))
    torch.testing.assert_close(m.map_to_diffusion(hidden), m.mapper.out(x))
    assert m.map_to_diffusion(hidden).shape == (2, 77, m.config.mapper.out_dim)
    probs = m.decide(hidden[:, 0])
    torch.testing.assert_close(probs, m.decision[1](hidden[:, 0]).softmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_retrieval_embeddings_are_normalised_and_scaled(tiny_fromage, images):
    m = tiny_fromage.model
    feats = m.encode_images(tiny_fromage.image_processor(images))
    img = m.image_embedding(feats)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(images)))
    txt = m.text_embedding(torch.randn(3, m.hidden_size))
    logits = m.retrieval_logits(txt, img)
    torch.testing.assert_close(logits, (txt @ img.T) / 0.07, rtol=1e-5, atol=1e-5)  # initial scale = 1/0.07


def test_fromage_has_no_generator(tiny_fromage):
    with pytest.raises(ValueError, match="can retrieve images but not generate"):
        tiny_fromage.model.map_to_diffusion(torch.zeros(1, 1, tiny_fromage.model.hidden_size))
