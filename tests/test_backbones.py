import dataclasses

import pytest
import torch

from fromage_gill.backbones import load_lm, load_tokenizer, load_vision, train_tiny_tokenizer
from fromage_gill.config import LMSpec, VisionSpec, load_config
from fromage_gill.pipeline import build_pipeline

OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_encoder_is_a_config_choice(images):
    import open_clip

    spec = VisionSpec(backend="open_clip", source="random", config=OPEN_CLIP_CFG)
    enc = load_vision(spec, dtype=torch.float32, device="cpu", seed=0)
    assert enc.out_dim == 24 and enc.processor.size == 32
    pixels = enc.processor(images[:2])
    torch.manual_seed(1)  # load_vision seeds random encoders with seed + 1
    ref = open_clip.CLIP(embed_dim=24, vision_cfg=OPEN_CLIP_CFG["vision_cfg"], text_cfg=OPEN_CLIP_CFG["text_cfg"])
    torch.testing.assert_close(enc(pixels), ref.visual.eval()(pixels))

    cfg = dataclasses.replace(load_config("tiny-fromage"), vision=spec)
    pipe = build_pipeline(cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert pipe.model.visual_embeddings.in_features == 24


def test_hf_clip_encoder_uses_the_pooler_output(images):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = load_config("tiny-fromage").vision
    enc = load_vision(cfg, dtype=torch.float32, device="cpu", seed=0)
    torch.manual_seed(1)
    ref = CLIPVisionModel(CLIPVisionConfig(**cfg.config)).eval()
    pixels = enc.processor(images[:2])
    torch.testing.assert_close(enc(pixels), ref(pixel_values=pixels).pooler_output)


def test_a_full_clip_checkpoint_loads_its_vision_tower_quietly_and_strictly(tmp_path, capsys, caplog):
    """A CLIPModel directory (text tower included, as the published and toy checkpoints are) loads as the vision
    encoder with the same weights and no load report; one missing a vision weight is an error naming it."""
    import dataclasses

    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    vision = load_config("tiny-fromage").vision
    torch.manual_seed(0)
    full = CLIPModel(
        CLIPConfig(
            vision_config=dict(vision.config),
            text_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
            ),
            projection_dim=8,
        )
    )
    full.save_pretrained(tmp_path / "clip")
    spec = dataclasses.replace(vision, source=str(tmp_path / "clip"), config={})
    enc = load_vision(spec, dtype=torch.float32, device="cpu")
    theirs = full.vision_model.state_dict()
    mine = enc.backbone.state_dict()
    assert len(theirs) == len(mine)
    for name, value in theirs.items():  # transformers 5 keeps the vision tower's weights at its top level
        assert torch.equal(value, mine.get(name, mine.get(f"vision_model.{name}"))), name
    out = capsys.readouterr()
    assert "LOAD REPORT" not in out.out + out.err and "UNEXPECTED" not in out.out + out.err + caplog.text
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing .*post_layernorm\.weight"):
        load_vision(spec, dtype=torch.float32, device="cpu")


def test_local_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tok = train_tiny_tokenizer(300)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(LMSpec(source=str(tmp_path / "tok")))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert len(loaded) == len(tok), "no token is added: the LM's vocabulary stays as it is"


def test_tiny_tokenizer_is_deterministic_and_round_trips():
    a, b = train_tiny_tokenizer(512), train_tiny_tokenizer(512)
    assert a.get_vocab() == b.get_vocab()
    text = "Q: Show me a photo of a red car.\nA: It is"
    assert a.decode(a(text, add_special_tokens=False).input_ids) == text


def test_local_lm_directory_loads_like_a_hub_model(tmp_path):
    cfg = load_config("tiny-fromage")
    tok = load_tokenizer(cfg.lm)
    lm = load_lm(cfg.lm, tok, dtype=torch.float32, device="cpu")
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    again = load_lm(
        LMSpec(source=str(tmp_path / "lm")),
        load_tokenizer(LMSpec(source=str(tmp_path / "lm"))),
        dtype=torch.float32,
        device="cpu",
    )
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(lm(input_ids=ids).logits, again(input_ids=ids).logits)
    assert not any(p.requires_grad for p in again.parameters())
