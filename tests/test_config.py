import dataclasses
import json

import pytest
import torch

from fromage_gill.config import ConfigError, ModelConfig, list_presets, load_config, load_preset
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
    (backbones / "clip" / "config.json").write_text(json.dumps(
        {"text_config": {"hidden_size": 64, "max_position_embeddings": 24}}))
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
        changes["mapper"] = dataclasses.replace(cfg.mapper, d_model=32, num_heads=2, dim_feedforward=64,
                                                num_encoder_layers=1, num_decoder_layers=1, out_dim=width)
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


def test_generation_settings_refuse_truthy_strings_and_loose_options():
    from fromage_gill.settings import GenerationSettings

    with pytest.raises(ValueError, match="stop_at_eos='no': must be true or false"):
        GenerationSettings(stop_at_eos="no")
    with pytest.raises(ValueError, match="decoding_options='k': must be None or a mapping"):
        GenerationSettings(decoding_options="k")
    with pytest.raises(ValueError, match="max_new_tokens=2.7: must be an integer"):
        GenerationSettings(max_new_tokens=2.7)
    assert GenerationSettings(decoding="magic", decoding_options={"k": 5}).decoding_options == {"k": 5}
