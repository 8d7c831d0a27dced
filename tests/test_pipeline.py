import pytest
import torch

from fromage_gill import ConfigError, list_presets, load_pipeline
from fromage_gill.cli import main
from fromage_gill.hub import HubUnavailableError


def _logits(pipe):
    m = pipe.model
    ids = torch.tensor([[pipe.tokenizer.bos_token_id, 40, 41, 42, m.image_token_ids[0]]])
    with torch.no_grad():
        return m.forward_lm(m.embed_tokens(ids)).logits


def test_tiny_presets_are_deterministic(tiny_gill, make_pipeline):
    again = make_pipeline("tiny-gill")
    for k, v in tiny_gill.model.trained_state_dict().items():
        assert torch.equal(v, again.model.trained_state_dict()[k]), k
    torch.testing.assert_close(_logits(tiny_gill), _logits(again), rtol=0, atol=0)
    assert "tiny-gill" in repr(tiny_gill) and "diffusion" in repr(tiny_gill)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_lm_loads_through_bitsandbytes(tiny_fromage, make_pipeline, quantization):
    import bitsandbytes as bnb

    pipe = make_pipeline("tiny-fromage", quantization=quantization)
    kinds = {type(mod) for mod in pipe.model.lm.modules()}
    assert (bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit) in kinds
    full, quant = _logits(tiny_fromage), _logits(pipe)
    # Quantization perturbs the values but not what the model says: the logits stay strongly correlated.
    corr = torch.corrcoef(torch.stack([full.flatten(), quant.flatten()]))[0, 1]
    assert corr > 0.9, corr
    assert not torch.equal(full, quant)


def test_device_map_auto_places_the_lm_through_accelerate(tiny_fromage, make_pipeline, tmp_path):
    pipe = make_pipeline("tiny-fromage", device_map="auto")
    torch.testing.assert_close(_logits(pipe), _logits(tiny_fromage))
    # With too little memory accelerate offloads the LM (here to disk, the CPU-only stand-in for "does not fit
    # on the GPUs"): weights live on the meta device and are fetched by hooks, and the outputs do not change.
    off = make_pipeline("tiny-fromage", device_map="auto", max_memory={"cpu": 20_000}, offload_folder=str(tmp_path))
    assert "disk" in set(off.model.lm.hf_device_map.values())
    assert off.model.lm.get_input_embeddings().weight.is_meta
    torch.testing.assert_close(_logits(off), _logits(tiny_fromage))


def test_unreachable_hub_gives_one_clear_error():
    with pytest.raises(HubUnavailableError) as e:
        load_pipeline("gill", device="cpu")
    message = str(e.value)
    assert "jykoh/gill" in message and "model_args.json" in message
    assert "--weights" in message and "serve --model toy-gill" in message


def test_unreachable_backbone_names_it(tmp_path):
    with pytest.raises(HubUnavailableError, match="facebook/opt-6.7b"):
        load_pipeline("fromage", weights="random", device="cpu")


def test_preset_without_weights_says_where_to_get_them():
    with pytest.raises(ValueError, match="fromage_vis4"):
        load_pipeline("fromage-vis4", device="cpu")


def test_bad_names_and_directories(tmp_path):
    with pytest.raises(ConfigError, match="Known presets: " + ", ".join(list_presets())):
        load_pipeline("tiny-gil")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pipeline("tiny-gill", dtype="int3")
    with pytest.raises(ValueError, match="quantization must be"):
        load_pipeline("tiny-fromage", quantization="3bit")


def test_cli_lists_presets_and_reports_errors_in_one_line(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("fromage", "gill", "tiny-gill"):
        assert name in out
    assert main(["convert", "/nonexistent/dir", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fromage-gill convert: error:") and "Traceback" not in err
