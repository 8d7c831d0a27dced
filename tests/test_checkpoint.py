"""Weights: this project's format round-trips; the published FROMAGe/GILL layouts (exact key names, reduced
widths) convert and load strictly; bad checkpoints fail naming the tensor."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fromage_gill.checkpoint import CheckpointError, read_decision_model, safe_torch_load
from fromage_gill.cli import main
from fromage_gill.config import load_config
from fromage_gill.pipeline import build_pipeline, load_pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"

# tiny presets: LM hidden 64, CLIP vision 32, retrieval 16, GILL mapper 32 wide, out 32.
D, V, R = 64, 32, 16


def _fromage_state(n_visual: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {  # key names exactly as in FORMATS.md
        "model.visual_embeddings.weight": r(D * n_visual, V),
        "model.visual_embeddings.bias": r(D * n_visual),
        "model.visual_fc.weight": r(R, V),
        "model.visual_fc.bias": r(R),
        "model.text_hidden_fcs.0.0.weight": r(R, D),
        "model.text_hidden_fcs.0.0.bias": r(R),
        "model.logit_scale": torch.tensor(2.5),
        "ret_input_embeddings.weight": r(1, D),
    }


def _gill_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tfm = torch.nn.Transformer(
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=64,
        dropout=0.0,
        batch_first=True,
        norm_first=True,
    )
    state = {
        "model.input_embeddings.weight": r(8, D),
        "model.visual_embeddings.weight": r(D * 4, V),
        "model.visual_embeddings.bias": r(D * 4),
        "model.visual_fc.weight": r(R, V),
        "model.visual_fc.bias": r(R),
        "model.ret_text_hidden_fcs.0.model.weight": r(R, D),
        "model.ret_text_hidden_fcs.0.model.bias": r(R),
        "model.gen_text_hidden_fcs.0.fc.weight": r(32, D),
        "model.gen_text_hidden_fcs.0.fc.bias": r(32),
        "model.gen_text_hidden_fcs.0.query_embs": r(1, 77, 32),
        "model.gen_text_hidden_fcs.0.model.weight": r(32, 32),
        "model.gen_text_hidden_fcs.0.model.bias": r(32),
        "model.logit_scale": torch.tensor(3.0),
    }
    for k, v in tfm.state_dict().items():
        state[f"model.gen_text_hidden_fcs.0.tfm.{k}"] = torch.randn(v.shape, generator=g)
    return state


def _write_published(directory: Path, state: dict, args: dict, decision: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 3}, directory / "pretrained_ckpt.pth.tar")
    (directory / "model_args.json").write_text(json.dumps(args))
    if decision is not None:
        torch.save({"state_dict": decision}, directory / "decision_model.pth.tar")
    return directory


FROMAGE_ARGS = {
    "opt_version": "facebook/opt-6.7b",
    "visual_encoder": "openai/clip-vit-large-patch14",
    "n_visual_tokens": 1,
    "shared_emb_dim": R,
    "text_emb_layers": [-1],
    "task": "multitask",
    "use_pooler": True,
    "retrieval_token_idx": 50266,
}
GILL_ARGS = {
    "opt_version": "facebook/opt-6.7b",
    "n_visual_tokens": 4,
    "ret_emb_dim": R,
    "gen_emb_dim": 32,
    "text_emb_layers": [-1],
    "text_fc_mode": "gill_mapper",
    "ret_text_fc_mode": "linear",
    "num_tokens": 8,
    "num_clip_tokens": 77,
    "retrieval_token_idx": list(range(50266, 50274)),
}


def test_native_save_and_reload_gives_identical_outputs(make_pipeline, tmp_path, images):
    pipe = make_pipeline("tiny-gill")
    with torch.no_grad():
        for p in pipe.model.trained_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)  # differ from the seeded init, so the load must really happen
    pipe.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = load_pipeline(tmp_path / "ckpt", device="cpu", dtype="fp32")
    for k, v in pipe.model.trained_state_dict().items():
        assert torch.equal(v, again.model.trained_state_dict()[k]), k
    feats = pipe.model.encode_images(pipe.image_processor(images[:2]))
    emb = torch.cat(
        [
            pipe.model.visual_tokens(feats).flatten(0, 1)[None],
            pipe.model.embed_tokens(torch.tensor([[3, 4, pipe.model.image_token_ids[0]]])),
        ],
        1,
    )
    torch.testing.assert_close(pipe.model.forward_lm(emb).logits, again.model.forward_lm(emb).logits, rtol=0, atol=0)


def test_published_fromage_checkpoint_converts_and_loads_strictly(tmp_path):
    state = _fromage_state()
    src = _write_published(tmp_path / "published", state, FROMAGE_ARGS)
    assert main(["convert", str(src), "--out", str(tmp_path / "conv"), "--preset", "tiny-fromage"]) == 0
    pipe = load_pipeline(tmp_path / "conv", device="cpu", dtype="fp32")
    m = pipe.model
    assert torch.equal(m.visual_fc.weight, state["model.visual_fc.weight"])
    assert torch.equal(m.text_fc.bias, state["model.text_hidden_fcs.0.0.bias"])
    assert torch.equal(m.image_token_embeddings, state["ret_input_embeddings.weight"])
    assert m.logit_scale.item() == 2.5
    # The published directory also loads directly, without converting.
    direct = load_pipeline(src, preset="tiny-fromage", device="cpu", dtype="fp32")
    assert torch.equal(direct.model.visual_embeddings.weight, state["model.visual_embeddings.weight"])


def test_published_gill_checkpoint_with_decision_model_loads(tmp_path):
    state = _gill_state()
    decision = {"1.weight": torch.randn(2, D), "1.bias": torch.randn(2)}
    src = _write_published(tmp_path / "gill", state, GILL_ARGS, decision)
    pipe = load_pipeline(src, preset="tiny-gill", device="cpu", dtype="fp32")
    m = pipe.model
    assert torch.equal(m.image_token_embeddings, state["model.input_embeddings.weight"])
    assert torch.equal(m.mapper.query_embs, state["model.gen_text_hidden_fcs.0.query_embs"])
    assert torch.equal(m.mapper.out.weight, state["model.gen_text_hidden_fcs.0.model.weight"])
    key = "model.gen_text_hidden_fcs.0.tfm.decoder.layers.0.multihead_attn.in_proj_weight"
    assert torch.equal(m.mapper.tfm.decoder.layers[0].multihead_attn.in_proj_weight, state[key])
    assert torch.equal(m.decision[1].weight, decision["1.weight"])


def test_gill_without_its_decision_model_is_refused_unless_told_to_run_without_one(tmp_path, images):
    src = _write_published(tmp_path / "gill", _gill_state(), GILL_ARGS)  # no decision_model.pth.tar
    with pytest.raises(CheckpointError, match=r"decision_model.pth.tar not found.*decision_model=False"):
        load_pipeline(src, preset="tiny-gill", device="cpu", dtype="fp32")
    assert main(["convert", str(src), "--out", str(tmp_path / "conv"), "--preset", "tiny-gill"]) == 2  # a user error
    assert (
        main(["convert", str(src), "--out", str(tmp_path / "conv"), "--preset", "tiny-gill", "--no-decision-model"])
        == 0
    )
    pipe = load_pipeline(src, preset="tiny-gill", device="cpu", dtype="fp32", decision_model=False)
    assert pipe.model.decision is None and not pipe.config.decision_head
    assert not load_pipeline(tmp_path / "conv", device="cpu", dtype="fp32").config.decision_head
    # Without a decision head every image follows the mode: auto with no index generates, and says nothing random.
    from fromage_gill.generate import Chat, GenerationSettings, ImageResult

    events = list(
        Chat(pipe).send(
            [images[0], "a"], GenerationSettings(max_new_tokens=4, image_logit_bias=50.0, num_inference_steps=1, seed=0)
        )
    )
    made = [e for e in events if isinstance(e, ImageResult)]
    assert made and all(e.source == "generated" and e.decision is None for e in made)


def test_missing_published_key_is_named(tmp_path):
    state = _gill_state()
    del state["model.gen_text_hidden_fcs.0.tfm.encoder.norm.bias"]
    state["model.some_new_head.weight"] = torch.zeros(1)
    decision = {"1.weight": torch.randn(2, D), "1.bias": torch.randn(2)}
    src = _write_published(tmp_path / "gill", state, GILL_ARGS, decision)
    with pytest.raises(CheckpointError) as e:
        load_pipeline(src, preset="tiny-gill", device="cpu", dtype="fp32")
    assert "missing: model.gen_text_hidden_fcs.0.tfm.encoder.norm.bias" in str(e.value)
    assert "unexpected: model.some_new_head.weight" in str(e.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    state = _fromage_state(n_visual=4)  # a vis4 checkpoint ...
    args = dict(FROMAGE_ARGS)  # ... whose args claim 1 visual token
    src = _write_published(tmp_path / "p", state, args)
    with pytest.raises(CheckpointError) as e:
        load_pipeline(src, preset="tiny-fromage", device="cpu", dtype="fp32")
    expected = "model.visual_embeddings.weight has shape (256, 32) in the checkpoint but (64, 32) in the model"
    assert expected in str(e.value)


def test_native_checkpoint_with_wrong_shape_is_refused(make_pipeline, tmp_path):
    pipe = make_pipeline("tiny-fromage")
    pipe.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["retrieval_dim"] = 8
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    expected = r"tensor visual_fc.weight has shape \(16, 32\) in the checkpoint but \(8, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        load_pipeline(tmp_path / "a", device="cpu", dtype="fp32")


class NotATensor:  # a pickle that weights_only=True must refuse
    pass


def test_unsafe_pickle_is_refused_never_loaded(tmp_path):
    path = tmp_path / "pretrained_ckpt.pth.tar"
    torch.save({"state_dict": {}, "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\).*never falls back"):
        safe_torch_load(path)


@pytest.mark.skipif(not (SHARED / "gill_opt" / "decision_model.pth.tar").is_file(), reason="../shared not present")
def test_the_published_gill_decision_model_loads():
    state = read_decision_model(SHARED / "gill_opt" / "decision_model.pth.tar")
    assert state["1.weight"].shape == (2, 4096) and state["1.bias"].shape == (2,)
    assert state["1.weight"].device.type == "cpu"  # saved on cuda:0; mapped to the CPU
    # Into a model whose LM is 4096 wide like OPT-6.7B: a skeleton LM (meta device) is enough for the heads.
    cfg = load_config("tiny-gill")
    lm = dict(cfg.lm.config, hidden_size=4096, word_embed_proj_dim=4096, num_hidden_layers=1, ffn_dim=64)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, config=lm))
    pipe = build_pipeline(cfg, device=torch.device("cpu"), dtype=torch.float32, skeleton=True)
    pipe.model.decision.load_state_dict(state)
    h = torch.randn(3, 4096)
    expected = (h @ state["1.weight"].T + state["1.bias"]).softmax(-1)
    torch.testing.assert_close(pipe.model.eval().decide(h), expected)


@pytest.mark.skipif(not (SHARED / "gill_opt" / "model_args.json").is_file(), reason="../shared not present")
def test_published_model_args_apply_to_their_presets():
    from fromage_gill.checkpoint import config_from_published_args

    cases = (("fromage", "fromage", 1), ("fromage_vis4", "fromage-vis4", 4), ("gill_opt", "gill", 4))
    for folder, preset, n_visual in cases:
        args = json.loads((SHARED / folder / "model_args.json").read_text())
        cfg = config_from_published_args(args, load_config(preset))
        assert cfg.n_visual_tokens == n_visual and cfg.retrieval_dim == 256
        assert cfg == load_config(preset)  # the shipped presets already say what the published args say
