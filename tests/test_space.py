"""A Hugging Face Space start, offline: the cache goes to persistent storage, only the files loading reads are
fetched, the published embeddings become an index once, the app starts from local weight folders with that index,
and ZeroGPU's decorator wraps the handlers that run the model when ``spaces`` is installed (a no-op elsewhere)."""

import json
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fromage_gill.chat import space
from fromage_gill.chat.space import GPU_METHODS, prepare_space, space_argv, use_zero_gpu
from fromage_gill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class FakeHub:
    """snapshot_download / hf_hub_download stand-ins: record each call, make the folder it would download."""

    def __init__(self, root: Path, safetensors: bool = True):
        self.root, self.safetensors, self.calls = root, safetensors, []

    def snapshot(self, *, repo_id: str, allow_patterns: list[str], cache_dir: Path | None) -> str:
        self.calls.append((repo_id, list(allow_patterns), cache_dir))
        path = self.root / repo_id
        path.mkdir(parents=True, exist_ok=True)
        if self.safetensors and any(p.endswith(".safetensors") for p in allow_patterns):
            (path / "model.safetensors").write_bytes(b"")
        return str(path)

    def file(self, *, repo_id: str, filename: str, repo_type: str | None, cache_dir: Path | None) -> str:
        self.calls.append((repo_id, filename, repo_type, cache_dir))
        return str(self.root / filename)


def test_the_cache_goes_to_hf_home_else_persistent_storage_else_the_default(tmp_path):
    data = tmp_path / "data"
    assert space.cache_dir({}, data) == (None, False)  # no /data mounted
    data.mkdir()
    assert space.cache_dir({}, data) == (data / ".huggingface" / "hub", True)
    assert space.cache_dir({"HF_HOME": "/x/hf"}, data) == (Path("/x/hf/hub"), True)


def test_a_space_fetches_only_what_loading_reads_into_persistent_storage(tmp_path, caplog):
    hub, data = FakeHub(tmp_path / "hub"), tmp_path / "data"
    data.mkdir()
    assets = prepare_space("gill", {"SPACE_ID": "me/gill"}, persistent=data, snapshot=hub.snapshot)
    cache = data / ".huggingface" / "hub"
    gill = load_config("gill")
    repos = [c[0] for c in hub.calls]
    assert repos == [gill.weights, gill.lm.source, gill.vision.source, SD15]
    assert all(c[2] == cache for c in hub.calls) and assets.persistent and assets.cache_dir == cache
    sd_patterns = hub.calls[3][1]
    assert "unet/diffusion_pytorch_model.safetensors" in sd_patterns and "text_encoder/model.safetensors" in sd_patterns
    # never SD's single-file checkpoints nor its fp16 / non-EMA copies (10+ GB nobody loads)
    assert not [p for p in sd_patterns if "ckpt" in p or "fp16" in p or "ema" in p or p == "*.safetensors"]
    assert assets.lm == hub.root / gill.lm.source and assets.index is None
    assert "FROMAGE_GILL_EMBEDDINGS is not set" in caplog.text

    flags = space.app_flags("gill", assets, {"FROMAGE_GILL_ARGS": "--load-8bit --concurrency 2"})
    assert flags[:2] == ["--model", "gill"] and flags[-3:] == ["--load-8bit", "--concurrency", "2"]
    assert flags[flags.index("--diffusion") + 1] == str(hub.root / SD15)


def test_a_repo_without_safetensors_gets_its_bin_weights(tmp_path):
    hub = FakeHub(tmp_path / "hub", safetensors=False)
    space.fetch_repo("facebook/opt-6.7b", None, download=hub.snapshot)
    assert len(hub.calls) == 2 and "*.safetensors" in hub.calls[0][1] and "*.bin" in hub.calls[1][1]


def test_embeddings_are_named_by_a_local_file_or_a_hub_file(tmp_path):
    hub = FakeHub(tmp_path)
    got = space.fetch_embeddings("hf://datasets/me/gill-cc3m/gill_opt/cc3m_embeddings_urls.npy", None, hub.file)
    assert hub.calls == [("me/gill-cc3m", "gill_opt/cc3m_embeddings_urls.npy", "dataset", None)]
    assert got == tmp_path / "gill_opt/cc3m_embeddings_urls.npy"
    with pytest.raises(ValueError, match=r"expected hf://\[datasets/\|spaces/\]OWNER/NAME/PATH"):
        space.fetch_embeddings("hf://me/file.npy", None, hub.file)
    with pytest.raises(FileNotFoundError, match="FROMAGE_GILL_EMBEDDINGS='/no/such.pkl': no such file"):
        space.fetch_embeddings("/no/such.pkl", None, hub.file)


def test_off_a_space_or_with_flags_nothing_is_fetched():
    def refuse(**_):
        raise AssertionError("fetched off a Space")

    assert space_argv(["--model", "toy-gill"], {}, snapshot=refuse) == ["--model", "toy-gill"]
    assert space_argv(["--model", "toy-gill"], {"SPACE_ID": "me/x"}, snapshot=refuse) == ["--model", "toy-gill"]
    assert space_argv([], {}, snapshot=refuse) == []


def _local_folders(root: Path) -> Path:
    """A FROMAGe whose LM, vision encoder and published-layout weights are local folders (tiny-fromage's widths):
    what a Space's cache holds after the downloads. Returns the model config file."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from fromage_gill.backbones import train_tiny_tokenizer

    tiny = load_config("tiny-fromage")
    torch.manual_seed(0)
    lm_dir, vision_dir, weights = root / "opt", root / "clip", root / "fromage"
    tok = train_tiny_tokenizer(512)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny.lm.config, **ids)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    CLIPVisionModel(CLIPVisionConfig(**tiny.vision.config)).save_pretrained(vision_dir)
    d, v, r = tiny.lm.config["hidden_size"], tiny.vision.config["hidden_size"], tiny.retrieval_dim
    g = torch.Generator().manual_seed(1)
    state = {
        "model.visual_embeddings.weight": torch.randn(d, v, generator=g),
        "model.visual_embeddings.bias": torch.randn(d, generator=g),
        "model.visual_fc.weight": torch.randn(r, v, generator=g),
        "model.visual_fc.bias": torch.randn(r, generator=g),
        "model.text_hidden_fcs.0.0.weight": torch.randn(r, d, generator=g),
        "model.text_hidden_fcs.0.0.bias": torch.randn(r, generator=g),
        "model.logit_scale": torch.tensor(2.5),
        "ret_input_embeddings.weight": torch.randn(1, d, generator=g),
    }
    weights.mkdir()
    torch.save({"state_dict": state}, weights / "pretrained_ckpt.pth.tar")
    args = {"n_visual_tokens": 1, "shared_emb_dim": r, "text_emb_layers": [-1]}
    (weights / "model_args.json").write_text(json.dumps(args))
    cfg = tiny.to_dict()
    cfg.update(name="space-fromage", weights=str(weights), weights_format="published")
    cfg["lm"], cfg["vision"] = {"source": str(lm_dir)}, {"backend": "hf_clip", "source": str(vision_dir)}
    (root / "space-fromage.json").write_text(json.dumps(cfg))
    return root / "space-fromage.json"


@pytest.mark.slow
def test_a_space_starts_the_app_from_local_folders_with_the_published_embeddings_indexed_once(tmp_path):
    from fromage_gill.chat.options import add_serve_args, load_app

    config = _local_folders(tmp_path / "cache")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    with open(tmp_path / "cc3m_embeddings.pkl", "wb") as f:  # the published layout (FORMATS.md)
        pickle.dump({"paths": [f"https://cc3m.example/{i}.jpg" for i in range(50)], "embeddings": emb}, f)
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "SPACE_ID": "me/fromage",
        "FROMAGE_GILL_MODEL": str(config),
        "FROMAGE_GILL_EMBEDDINGS": str(tmp_path / "cc3m_embeddings.pkl"),
        "FROMAGE_GILL_ARGS": "--device cpu --dtype fp32",
    }

    def offline(**kw):
        raise AssertionError(f"downloaded {kw}")

    flags = space_argv([], env, persistent=data, snapshot=offline)
    index_dir = data / ".huggingface" / "indexes" / "space-fromage-cc3m"
    assert flags[flags.index("--index") + 1] == f"cc3m={index_dir}"
    assert flags[flags.index("--lm") + 1] == str(tmp_path / "cache" / "opt")

    import argparse

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    pipeline, options = load_app(parser.parse_args(flags))
    index = options.indexes["cc3m"]  # loaded with the app model's fingerprint: the same retrieval space
    assert len(index) == 50 and index.record(7)["url"] == "https://cc3m.example/7.jpg"
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert index.search(torch.from_numpy(unit[7:8]), k=1).ids[0, 0] == 7

    # a restart finds the index on persistent storage: nothing is imported again
    def no_import(*_):
        raise AssertionError("imported again")

    assert space_argv([], env, persistent=data, snapshot=offline, import_embeddings=no_import) == flags


def _fake_spaces(monkeypatch) -> list:
    calls = []

    def gpu_decorator(duration):
        def wrap(fn):
            def on_gpu(*a, **k):
                calls.append((fn.__name__, duration))
                return fn(*a, **k)

            return on_gpu

        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu_decorator))
    return calls


def test_zero_gpu_wraps_the_handlers_that_run_the_model_when_spaces_is_installed(monkeypatch):
    from fromage_gill.chat.handlers import ChatHandlers

    for name in GPU_METHODS:  # restored after the test
        monkeypatch.setattr(ChatHandlers, name, getattr(ChatHandlers, name))
    calls = _fake_spaces(monkeypatch)
    assert use_zero_gpu(duration=90) and use_zero_gpu(duration=90)  # idempotent: wrapped once
    handlers = object.__new__(ChatHandlers)
    with pytest.raises(Exception):  # noqa: B017  the handler itself runs (and fails on this bare object)
        list(handlers.send(None, None))
    assert calls == [("send", 90)]
    assert space.gpu(len)("abc") == 3 and calls[-1] == ("len", 120)


def test_without_spaces_gpu_is_a_no_op(monkeypatch):
    from fromage_gill.chat.handlers import ChatHandlers

    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    send = ChatHandlers.send
    assert space.gpu(len) is len and not use_zero_gpu() and ChatHandlers.send is send


def test_requirements_install_what_the_package_needs_without_the_package_itself():
    """A Space installs requirements.txt before it copies the repository, so it lists the dependencies (not
    `.[app]`); app.py imports fromage_gill from the checkout."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
    assert len(deps) >= 10
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[ ]", ln)[0].lower().replace("_", "-") for ln in lines if ln}
    for dep in deps:
        assert re.split(r"[<>=!~\[ ]", dep)[0].lower().replace("_", "-") in names, dep
    assert {"gradio", "bitsandbytes"} <= names and not any(ln.startswith(".") for ln in lines)


def test_the_readme_front_matter_names_the_app_and_the_hardware():
    head = (ROOT / "README.md").read_text().split("---\n")[1]
    fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line and not line.startswith(" "))
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py"
    assert fields["suggested_hardware"] in {"a10g-small", "a10g-large", "l4x1", "a100-large"}
