"""The published models at full size without their weights: the shipped architectures build on the meta device
with the parameter counts of the real backbones, and published-layout GILL / FROMAGe checkpoints at full width
(shapes as FORMATS.md gives them) convert and load strictly into the models they build."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fromage_gill.backbones import load_lm, load_tokenizer, load_vision
from fromage_gill.checkpoint import CheckpointError
from fromage_gill.cli import main
from fromage_gill.config import ConfigError, architecture, list_architectures, load_config
from fromage_gill.pipeline import load_pipeline

D, V, R = 4096, 1024, 256  # OPT-6.7B hidden, CLIP ViT-L/14 pooler, the retrieval space (FORMATS.md)
OPT, CLIP_L, SD15 = "facebook/opt-6.7b", "openai/clip-vit-large-patch14", "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _opt_params(c: dict) -> int:
    """OPT's parameters from its config, by hand: token + learned position embeddings (OPT offsets positions by
    2), per layer q/k/v/out projections, the two FFN layers and two layer norms, the final layer norm; the output
    projection is tied to the token embeddings."""
    d, f, n = c["hidden_size"], c["ffn_dim"], c["num_hidden_layers"]
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    return c["vocab_size"] * d + (c["max_position_embeddings"] + 2) * d + n * layer + 2 * d


def _clip_layers(c: dict) -> int:
    d, f = c["hidden_size"], c["intermediate_size"]
    return c["num_hidden_layers"] * (4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d)


def _clip_vision_params(c: dict) -> int:
    """Patch conv (no bias), class embedding, one position per patch + CLS, pre- and post-layer norms, layers."""
    d, p, s = c["hidden_size"], c["patch_size"], c["image_size"]
    return 3 * p * p * d + d + ((s // p) ** 2 + 1) * d + 2 * d + _clip_layers(c) + 2 * d


def _clip_text_params(c: dict) -> int:
    d = c["hidden_size"]
    return c["vocab_size"] * d + c["max_position_embeddings"] * d + _clip_layers(c) + 2 * d


def test_every_published_backbone_has_a_shipped_architecture():
    assert {OPT, CLIP_L, SD15} <= set(list_architectures())
    for preset in ("gill", "fromage", "fromage-vis4"):
        cfg = load_config(preset).with_random_backbones()
        assert cfg.lm.source == cfg.vision.source == "random"
        assert cfg.lm.config == architecture(OPT) and cfg.vision.config == architecture(CLIP_L)
    gill = load_config("gill").with_random_backbones()
    assert gill.diffusion.config == architecture(SD15) and gill.diffusion.safety_checker is False


def test_the_architectures_build_on_meta_with_the_real_parameter_counts():
    gill = load_config("gill").with_random_backbones()
    lm = load_lm(gill.lm, load_tokenizer(gill.lm), dtype=torch.bfloat16, device="cpu", skeleton=True)
    vision = load_vision(gill.vision, dtype=torch.bfloat16, device="cpu", skeleton=True)
    assert all(p.is_meta for p in lm.parameters()) and all(p.is_meta for p in vision.parameters())
    assert _count(lm) == _opt_params(gill.lm.config)
    assert 6.6e9 < _count(lm) < 6.7e9  # "6.7B"
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # tied, as OPT ships
    assert _count(vision.backbone) == _clip_vision_params(gill.vision.config)
    assert 3.0e8 < _count(vision.backbone) < 3.1e8 and vision.out_dim == V and vision.processor.size == 224

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = gill.diffusion.config
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**sd["unet"]), AutoencoderKL(**sd["vae"])
        text = CLIPTextModel(CLIPTextConfig(**sd["text_encoder"]))
    assert _count(text) == _clip_text_params(sd["text_encoder"]) and text.config.hidden_size == 768
    # The UNet's and VAE's counts as the SD v1.5 model card and diffusers report them (no hand formula: too many
    # block kinds to count by hand without re-deriving diffusers).
    assert _count(unet) == 859_520_964
    assert _count(vae) == 83_653_863
    assert unet.config.cross_attention_dim == gill.mapper.out_dim  # the GILLMapper's 768-d output conditions it
    assert 2 ** (len(vae.config.block_out_channels) - 1) * unet.config.sample_size == 512  # 512 px images


def _gill_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of a published GILL pretrained_ckpt.pth.tar at full width, shapes as FORMATS.md lists them."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = {
        "model.input_embeddings.weight": r(8, D),
        "model.visual_embeddings.weight": r(D * 4, V),
        "model.visual_embeddings.bias": r(D * 4),
        "model.visual_fc.weight": r(R, V),
        "model.visual_fc.bias": r(R),
        "model.ret_text_hidden_fcs.0.model.weight": r(R, D),
        "model.ret_text_hidden_fcs.0.model.bias": r(R),
        "model.gen_text_hidden_fcs.0.fc.weight": r(512, D),
        "model.gen_text_hidden_fcs.0.fc.bias": r(512),
        "model.gen_text_hidden_fcs.0.query_embs": r(1, 77, 512),
        "model.gen_text_hidden_fcs.0.model.weight": r(768, 512),
        "model.gen_text_hidden_fcs.0.model.bias": r(768),
        "model.logit_scale": torch.tensor(2.0),
    }
    with torch.device("meta"):  # only its key names and shapes
        tfm = torch.nn.Transformer(512, 4, 4, 4, 2048, dropout=0.0, batch_first=True, norm_first=True)
    for k, v in tfm.state_dict().items():
        state[f"model.gen_text_hidden_fcs.0.tfm.{k}"] = r(*v.shape)
    return state


def _fromage_state(g: torch.Generator, n_visual: int) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "model.visual_embeddings.weight": r(D * n_visual, V),
        "model.visual_embeddings.bias": r(D * n_visual),
        "model.visual_fc.weight": r(R, V),
        "model.visual_fc.bias": r(R),
        "model.text_hidden_fcs.0.0.weight": r(R, D),
        "model.text_hidden_fcs.0.0.bias": r(R),
        "model.logit_scale": torch.tensor(2.5),
        "ret_input_embeddings.weight": r(1, D),
    }


# The fields of the published model_args.json files the loader reads (the rest are legacy; FORMATS.md).
ARGS = {
    "gill_opt": {
        "n_visual_tokens": 4,
        "ret_emb_dim": R,
        "gen_emb_dim": 768,
        "num_tokens": 8,
        "num_clip_tokens": 77,
        "text_emb_layers": [-1],
        "text_fc_mode": "gill_mapper",
        "opt_version": OPT,
    },
    "fromage": {"n_visual_tokens": 1, "shared_emb_dim": R, "text_emb_layers": [-1], "opt_version": OPT},
    "fromage_vis4": {"n_visual_tokens": 4, "shared_emb_dim": R, "text_emb_layers": [-1], "opt_version": OPT},
}


def _write(directory: Path, state: dict, args_folder: str, decision: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    torch.save({"state_dict": state}, directory / "pretrained_ckpt.pth.tar")
    (directory / "model_args.json").write_text(json.dumps(ARGS[args_folder]))
    if decision is not None:
        torch.save({"state_dict": decision}, directory / "decision_model.pth.tar")
    return directory


def _published_to_ours(pipe) -> dict[str, str]:
    from fromage_gill.checkpoint import published_names

    return published_names(pipe.model, pipe.config.kind)


@pytest.mark.slow
def test_a_full_width_gill_checkpoint_converts_and_loads_strictly(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = _gill_state(g)
    decision = {"1.weight": torch.randn(2, D, generator=g), "1.bias": torch.randn(2, generator=g)}
    src = _write(tmp_path / "gill", state, "gill_opt", decision)

    direct = load_pipeline(src, device="cpu", dtype="fp32", skeleton=True, random_weights=True)
    names = _published_to_ours(direct)
    model = direct.model.trained_parameters()
    # every tensor of the file has its place, and every place its tensor, at the file's shape
    assert sorted(names[k] for k in model if not k.startswith("decision.")) == sorted(state)
    for ours, p in model.items():
        theirs = names[ours]
        ref = decision[theirs.split(":")[1]] if theirs.startswith("decision_model") else state[theirs]
        assert torch.equal(p, ref), theirs

    out = tmp_path / "converted"
    assert main(["convert", str(src), "--out", str(out), "--random-weights"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["lm"]["source"], written["vision"]["source"], written["diffusion"]["source"]) == (OPT, CLIP_L, SD15)
    again = load_pipeline(out, device="cpu", dtype="fp32", skeleton=True, random_weights=True)
    for k, v in model.items():
        assert torch.equal(again.model.trained_parameters()[k], v), k
    assert again.model.hidden_size == D and again.model.mapper is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("folder", "preset", "n_visual"), [("fromage", "fromage", 1), ("fromage_vis4", "fromage-vis4", 4)]
)
def test_a_full_width_fromage_checkpoint_converts_and_loads_strictly(tmp_path, folder, preset, n_visual):
    state = _fromage_state(torch.Generator().manual_seed(1), n_visual)
    src = _write(tmp_path / folder, state, folder)
    out = tmp_path / "converted"
    assert main(["convert", str(src), "--out", str(out), "--preset", preset, "--random-weights"]) == 0
    pipe = load_pipeline(out, device="cpu", dtype="fp32", skeleton=True, random_weights=True)
    names = _published_to_ours(pipe)
    assert sorted(names.values()) == sorted(state)
    for ours, p in pipe.model.trained_parameters().items():
        assert torch.equal(p, state[names[ours]]), names[ours]
    assert pipe.config.n_visual_tokens == n_visual and pipe.model.hidden_size == D


def test_a_checkpoint_of_another_width_is_refused_naming_the_tensor(tmp_path):
    state = _fromage_state(torch.Generator().manual_seed(2), 1)
    state["model.text_hidden_fcs.0.0.weight"] = torch.zeros(R, 2048)  # an OPT-1.3B-wide text side
    src = _write(tmp_path / "fromage", state, "fromage")
    with pytest.raises(
        CheckpointError, match=r"model\.text_hidden_fcs\.0\.0\.weight has shape \(256, 2048\).*\(256, 4096\)"
    ):
        load_pipeline(src, preset="fromage", device="cpu", dtype="fp32", skeleton=True, random_weights=True)


def test_random_weights_never_downloads_and_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(ValueError, match="cannot be combined with lm="):
        load_pipeline("gill", random_weights=True, lm=str(tmp_path), skeleton=True)
    cfg = load_config("fromage").to_dict()
    cfg["lm"]["source"] = "EleutherAI/gpt-j-6b"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"lm\.source 'EleutherAI/gpt-j-6b' has no shipped architecture.*shipped:"):
        load_pipeline(tmp_path / "c.json", random_weights=True, skeleton=True)
    # gill names jykoh/gill (a Hub repo): its trained layers become random rather than being fetched
    pipe = load_pipeline("gill", random_weights=True, skeleton=True, device="cpu", dtype="fp32")
    assert pipe.config.weights == "random" and pipe.config.lm.source == "random"


def _script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_real_scale_runs_every_section_in_tiny_mode(tmp_path):
    out = tmp_path / "figures.json"
    result = _script("bench_real_scale").main(
        ["--tiny", "--new-tokens", "2", "--quant-new-tokens", "2", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    gill = result["gill"]
    parts = gill["components"]
    for name in ("lm", "vision", "unet", "vae", "text_encoder"):
        buffers = parts[name]["bytes"] - 2 * parts[name]["params"]  # bf16: two bytes a parameter, plus buffers
        assert 0 <= buffers < 0.01 * parts[name]["bytes"], name
    assert gill["decode"]["same_tokens"]  # our greedy loop and generate agree on a tiny fp32-initialised LM
    assert gill["turn_retrieve"]["images"] == ["retrieved 64x64"] and gill["index"]["rows"] == 2048
    assert gill["turn_generate"]["images"] == ["generated 16x16"]  # tiny-gill's VAE: 8 px latents x 2
    assert gill["turn_text"]["images"] == []
    for bits in ("lm-8bit", "lm-4bit"):
        q = result[bits]
        assert q["lm_fp32_bytes"] == 4 * q["lm_params"] and 0 < q["lm_bytes"] < q["lm_fp32_bytes"] / 2
    assert result["lm-4bit"]["lm_bytes"] < result["lm-8bit"]["lm_bytes"]


def test_gpu_check_plans_without_a_gpu_and_runs_tiny_on_the_cpu(tmp_path, capsys):
    gpu_check = _script("gpu_check")
    plan = gpu_check.main(["--dry-run"])["plan"]
    assert plan["model"] == "gill" and set(plan["configs"]) == {"bf16", "lm-8bit", "lm-4bit"}
    assert "50 steps" in plan["diffusion"] and "turns 1 and 10" in plan["first_token"]
    out = tmp_path / "gpu.json"
    args = ["--tiny", "--only", "bf16", "--new-tokens", "2", "--repeats", "1", "--steps", "1", "--turns", "2"]
    result = gpu_check.main([*args, "--json", str(out)])
    bf16 = result["bf16"]
    assert json.loads(out.read_text())["bf16"]["decode"] == bf16["decode"] and bf16["decode"]["same_tokens"]
    assert set(bf16["first_token"]) == {"turn_1_ms", "turn_2_ms"} and bf16["diffusion"]["image"] == "16x16"
