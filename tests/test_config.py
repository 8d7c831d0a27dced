import dataclasses
import json
import re

import pytest
import torch

from fromage_gill.config import ConfigError, ModelConfig, list_presets, load_config, load_preset
from fromage_gill.paths import CHECKOUT_ROOT, checkout_path
from fromage_gill.pipeline import build_pipeline


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config("gil")
    for name in ("fromage", "gill", "tiny-gill"):
        assert name in str(e.value)


def test_a_folder_named_like_a_preset_wins_in_load_config_but_not_in_load_preset(tmp_path, monkeypatch):
    # A trained model saved as ./toy-gill is what a user means by "toy-gill" there; code that means the shipped
    # preset (the toy build) must still get the preset.
    other = dataclasses.replace(load_config("toy-gill"), generation=None, decision_dropout=0.5)
    (tmp_path / "toy-gill").mkdir()
    other.save(tmp_path / "toy-gill" / "config.json")
    monkeypatch.chdir(tmp_path)
    assert load_config("toy-gill").generation is None
    preset = load_preset("toy-gill")
    assert preset.generation["image_query"] == "answer" and preset.decision_dropout == 0.0
    with pytest.raises(ConfigError, match="known presets"):
        load_preset("toy-gil")


def test_toy_method_config_reads_the_preset_not_a_folder_in_the_working_directory(tmp_path, monkeypatch):
    from fromage_gill.toy.method import method_config

    backbones = tmp_path / "elsewhere" / "toy"
    (backbones / "clip").mkdir(parents=True)
    (backbones / "clip" / "config.json").write_text(
        json.dumps({"text_config": {"hidden_size": 64, "max_position_embeddings": 24}})
    )
    (tmp_path / "toy-gill").mkdir()
    dataclasses.replace(load_config("toy-gill"), generation=None).save(tmp_path / "toy-gill" / "config.json")
    monkeypatch.chdir(tmp_path)
    cfg = method_config("gill", backbones)
    assert cfg.generation == load_preset("toy-gill").generation
    assert cfg.lm.source == str(backbones / "lm") and cfg.mapper.out_dim == 64 and cfg.mapper.num_queries == 24


def test_config_round_trips_through_json(tmp_path):
    cfg = load_config("tiny-gill")
    path = tmp_path / "cfg.json"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again.num_image_tokens == 8 and again.can_generate and again.is_random


def _write(tmp_path, data) -> str:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_missing_field_is_named(tmp_path):
    data = load_config("tiny-fromage").to_dict()
    del data["n_visual_tokens"]
    with pytest.raises(ConfigError, match="missing required field 'n_visual_tokens'"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_visual_tokens", "4", "'n_visual_tokens' must be int, got str"),
        ("n_visual_tokens", True, "'n_visual_tokens' must be int, got bool"),
        ("image_tokens", "[RET]", "'image_tokens' must be a list"),
        ("kind", "blip", "'kind' must be one of 'fromage', 'gill'"),
    ],
)
def test_wrongly_typed_field_is_named(tmp_path, field, value, message):
    data = load_config("tiny-fromage").to_dict()
    data[field] = value
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data))


def test_nested_and_unknown_fields_are_named(tmp_path):
    data = load_config("tiny-gill").to_dict()
    data["mapper"]["num_queries"] = 7.5
    with pytest.raises(ConfigError, match="'mapper.num_queries' must be int"):
        load_config(_write(tmp_path, data))
    data = load_config("tiny-gill").to_dict()
    data["n_visual_token"] = 2
    with pytest.raises(ConfigError, match="unknown field.*n_visual_token"):
        load_config(_write(tmp_path, data))
    data = load_config("tiny-gill").to_dict()
    data["dialogue"]["answer_images"] = "drop"
    with pytest.raises(ConfigError, match="'dialogue.answer_images' must be one of 'tokens', 'omit'"):
        load_config(_write(tmp_path, data))


def test_semantic_validation_says_how_to_fix():
    cfg = load_config("tiny-gill")
    with pytest.raises(ConfigError, match="needs diffusion"):
        dataclasses.replace(cfg, diffusion=None)
    with pytest.raises(ConfigError, match="divisible"):
        dataclasses.replace(cfg.mapper, num_heads=3)
    with pytest.raises(ConfigError, match="GILL parts"):
        dataclasses.replace(load_config("tiny-fromage"), decision_head=True)
    with pytest.raises(ConfigError, match=r"decision_dropout must be in \[0, 1\)"):
        dataclasses.replace(cfg, decision_dropout=1.0)


def test_invalid_json_is_reported(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(path))


def reduced(cfg: ModelConfig) -> ModelConfig:
    """A shipped preset with its frozen components swapped for random ones of the same kind and reduced width,
    keeping everything the preset itself decides (visual tokens, image tokens, retrieval width, mapper shape)."""
    tiny = load_config("tiny-gill")
    changes = {"lm": tiny.lm, "vision": tiny.vision, "weights": "random"}
    if cfg.diffusion is not None:
        width = tiny.diffusion.config["text_encoder"]["hidden_size"]
        changes["diffusion"] = tiny.diffusion
        changes["mapper"] = dataclasses.replace(
            cfg.mapper,
            d_model=32,
            num_heads=2,
            dim_feedforward=64,
            num_encoder_layers=1,
            num_decoder_layers=1,
            out_dim=width,
        )
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("name", [n for n in list_presets() if isinstance(load_config(n), ModelConfig)])
def test_every_shipped_preset_builds(name):
    cfg = load_config(name)
    small = cfg if cfg.is_random else reduced(cfg)
    pipe = build_pipeline(small, device=torch.device("cpu"), dtype=torch.float32)
    m = pipe.model
    assert m.image_token_ids == pipe.tokenizer.convert_tokens_to_ids(list(cfg.image_tokens))
    assert m.visual_embeddings.out_features == m.hidden_size * cfg.n_visual_tokens
    assert m.text_fc.out_features == cfg.retrieval_dim
    assert (pipe.diffusion is not None) == cfg.can_generate
    if cfg.mapper is not None:
        assert m.mapper.query_embs.shape[1] == cfg.mapper.num_queries


def test_generation_defaults_are_checked_when_the_preset_loads(tmp_path):
    data = load_config("tiny-gill").to_dict()
    data["generation"] = {"image_logit_bias": 4.0, "max_images": 1}
    assert load_config(_write(tmp_path, data)).generation == {"image_logit_bias": 4.0, "max_images": 1}
    data["generation"] = {"image_bias": 4.0}
    with pytest.raises(ConfigError, match="generation: .*image_bias"):
        load_config(_write(tmp_path, data))
    data["generation"] = {"max_images": -1}
    with pytest.raises(ConfigError, match="generation: .*max_images"):
        load_config(_write(tmp_path, data))


# ------------------------------------------------------------------------------------------ wrong types, named


def _nested(name: str, path: str, value):
    data = load_config(name).to_dict()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("preset", "path", "value", "message"),
    [
        # inline transformers configs: before, these loaded and the build raised StrictDataclassFieldValidationError
        (
            "tiny-fromage",
            "lm.config.hidden_size",
            "64",
            r"lm.config \(a transformers 'opt' config\).*'hidden_size'.*str",
        ),
        ("tiny-fromage", "lm.config.vocab_size", 2.7, r"lm.config .*'vocab_size' expected int, got float"),
        (
            "tiny-fromage",
            "lm.config.model_type",
            "opt2",
            r"lm.config.model_type 'opt2' is not a transformers model type",
        ),
        ("tiny-gill", "vision.config.hidden_size", 32.5, r"vision.config .*'hidden_size' expected int"),
        (
            "tiny-gill",
            "diffusion.config.text_encoder.vocab_size",
            "512",
            r"diffusion.config.text_encoder .*'vocab_size'",
        ),
        ("tiny-gill", "diffusion.config.unet", "small", r"diffusion.config.unet must be an object, got str"),
        ("tiny-magic", "clip.config.text_config.hidden_size", 2.7, r"clip.config .*'hidden_size' expected int"),
        # our own fields: before, a ZeroDivisionError, or accepted
        ("tiny-gill", "mapper.num_heads", 0, r"mapper.num_heads must be >= 1, got 0"),
        ("tiny-gill", "mapper.out_dim", 0, r"mapper.out_dim must be >= 1, got 0"),
        ("tiny-magic", "decoding.beta", float("inf"), r"beta .* must be >= 0 and finite"),
        (
            "tiny-fromage",
            "generation",
            {"decoding_options": "k=5"},
            r"generation: .*decoding_options.*must be None or a",
        ),
        ("tiny-fromage", "generation", {"stop_at_eos": "no"}, r"generation: .*stop_at_eos='no': must be true or false"),
    ],
)
def test_wrong_types_anywhere_are_config_errors_naming_the_field(tmp_path, preset, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _nested(preset, path, value)))


def test_floats_are_refused_not_truncated_when_built_in_code():
    """from_dict checks types through _coerce; code that builds the dataclasses itself gets the same answer."""
    from fromage_gill.config import DialogueSpec, MagicDecoding, MapperSpec

    cfg = load_config("tiny-gill")
    cases = [
        (lambda: MagicDecoding(max_new_tokens=2.7), "max_new_tokens must be an integer >= 1, got float 2.7"),
        (lambda: MagicDecoding(clip_text_max_tokens=2.7), "clip_text_max_tokens must be an integer >= 1"),
        (lambda: MapperSpec(num_queries=7.5), "mapper.num_queries must be an integer >= 1, got float 7.5"),
        (lambda: DialogueSpec(max_exchanges=2.7), "dialogue.max_exchanges must be an integer >= 0 or null"),
        (lambda: dataclasses.replace(cfg, n_visual_tokens=2.7), "n_visual_tokens must be an integer >= 1"),
        (lambda: dataclasses.replace(cfg, seed=2.7), "seed must be an integer, got float 2.7"),
        (lambda: dataclasses.replace(cfg, decision_dropout="0.5"), r"decision_dropout must be in \[0, 1\)"),
        (lambda: MagicDecoding(alpha="0.1"), r"alpha .* must be in \[0, 1\], got '0.1'"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError, match=message):
            make()


def test_generation_settings_refuse_truthy_strings_and_loose_options():
    from fromage_gill.settings import GenerationSettings

    with pytest.raises(ValueError, match="stop_at_eos='no': must be true or false"):
        GenerationSettings(stop_at_eos="no")
    with pytest.raises(ValueError, match="decoding_options='k': must be None or a mapping"):
        GenerationSettings(decoding_options="k")
    with pytest.raises(ValueError, match="max_new_tokens=2.7: must be an integer"):
        GenerationSettings(max_new_tokens=2.7)
    assert GenerationSettings(decoding="magic", decoding_options={"k": 5}).decoding_options == {"k": 5}


# ------------------------------------------------------------------------------------------ sizes, depth, paths


def _tiny_with(tmp_path, edit) -> str:
    data = load_config("tiny-fromage").to_dict()
    edit(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("retrieval_dim", 5_000_000, r"retrieval_dim must be <= 65,536 \(wider than any model's state.*got 5,000,000"),
        ("retrieval_dim", 10**9, r"retrieval_dim must be <= 65,536 .*got 1,000,000,000"),
        ("n_visual_tokens", 10**9, r"n_visual_tokens must be <= 1,024 \(each takes a position"),
        ("image_tokens", [f"[T{i}]" for i in range(2000)], r"image_tokens holds 2,000 tokens, more than 1024"),
    ],
)
def test_sizes_beyond_what_a_model_holds_are_refused_when_read(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_tiny_with(tmp_path, lambda d: d.update({field: value})))


def test_mapper_sizes_are_bounded(tmp_path):
    def edit(d):
        d.update(load_config("tiny-gill").to_dict())
        d["mapper"]["dim_feedforward"] = 10**8

    with pytest.raises(ConfigError, match=r"mapper.dim_feedforward must be <= 65,536"):
        load_config(_tiny_with(tmp_path, edit))


def test_a_wide_retrieval_space_is_refused_before_memory_is_spent(tmp_path):
    """The issue's 5,000,000-wide config spent 5.8 GB before an error: it must be refused under 200 MB."""
    import subprocess
    import sys

    config = _tiny_with(tmp_path, lambda d: d.update(retrieval_dim=5_000_000))
    # Peak RSS from VmHWM, this process's own high-water mark: getrusage's ru_maxrss would carry the pytest
    # parent's peak over fork and exec
    script = f"""
from fromage_gill import load_pipeline
from fromage_gill.config import ConfigError

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

before = status("VmRSS")  # torch, transformers and the package imported: what every command has already paid
try:
    load_pipeline({config!r}, weights="random", device="cpu", dtype="fp32")
except ConfigError as e:
    print("REFUSED", status("VmHWM") - before, e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr
    spent = int(out.stdout.split()[1])
    assert spent < 200 * 1024 * 1024, f"{spent / 1e6:.0f} MB spent before the refusal"
    assert "retrieval_dim must be <= 65,536" in out.stdout


def test_a_random_backbone_larger_than_memory_is_refused_before_allocation(tmp_path):
    path = _tiny_with(tmp_path, lambda d: d["lm"]["config"].update(hidden_size=2**20, ffn_dim=2**20))
    from fromage_gill import load_pipeline

    with pytest.raises(ConfigError, match=r"lm.config describes a model of [\d,]+ parameters .* GB .*reduce its sizes"):
        load_pipeline(path, weights="random", device="cpu", dtype="fp32")


def test_deep_nesting_and_huge_files_are_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"name": "x", "kind": "fromage", "lm": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"deep.json nests more than 32 levels deep \(at character \d+\)"):
        load_config(path)
    big = tmp_path / "big.json"
    with open(big, "w") as f:
        f.write('{"description": "')
        f.write("x" * (17 * 1024 * 1024))
        f.write('"}')
    with pytest.raises(ConfigError, match=r"big.json is [\d,]+ bytes; a config is a few kB"):
        load_config(big)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.json is not UTF-8 text"):
        load_config(latin)


@pytest.mark.parametrize("source", ["repo:../../../../etc", "repo:/etc", "repo:checkpoints/../../outside"])
@pytest.mark.parametrize("field", ["lm.source", "vision.source", "weights"])
def test_repo_paths_stay_inside_the_checkout(tmp_path, source, field):
    def edit(d):
        if field == "weights":
            d["weights"] = source
        else:
            part, key = field.split(".")
            d[part] = {**d[part], key: source}

    with pytest.raises(ConfigError, match=rf"{field} '{re.escape(source)}' leaves the repository checkout"):
        load_config(_tiny_with(tmp_path, edit))
    with pytest.raises(ValueError, match="leaves the repository checkout"):
        checkout_path(source, must_exist=False)
    inside = checkout_path("repo:checkpoints/./toy/../toy/lm", must_exist=False)
    assert inside == str(CHECKOUT_ROOT / "checkpoints" / "toy" / "lm")


def test_the_worked_example_for_another_lm_in_docs_training_is_a_valid_config(tmp_path):
    text = (CHECKOUT_ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Grounding another LM and vision encoder") :]
    block = section[section.index("```json\n") + len("```json\n") : section.index("\n```", section.index("```json"))]
    path = tmp_path / "qwen-fromage.json"
    path.write_text(block)
    cfg = load_config(path)  # parsed and validated as `train --model qwen-fromage.json` reads it; nothing downloaded
    assert isinstance(cfg, ModelConfig) and cfg.kind == "fromage" and cfg.weights is None
    assert cfg.lm.source == "Qwen/Qwen2.5-1.5B" and cfg.vision.backend == "hf_clip"
    assert cfg.dialogue.assistant_prefix == "\nA:"
