"""The toy build machinery: every stage runs (a few steps each) and writes directories that fromage_gill's own
loaders read; "repo:" paths in presets resolve inside the checkout. Quality is measured by the real build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fromage_gill.backbones import load_diffusion, load_lm, load_tokenizer, load_vision
from fromage_gill.config import DiffusionSpec, LMSpec, VisionSpec
from fromage_gill.paths import checkout_path
from fromage_gill.toy import pretrain
from fromage_gill.toy import world as W
from fromage_gill.toy.build import REPORT, build


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "toy"  # the method stage writes next to out: keep its parent private
    threads = torch.get_num_threads()
    try:
        report = build(out, recipe=pretrain.Recipe.smoke(), threads=1, n_data=48)  # every stage, method included
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_every_stage_reports_time_and_quality(smoke_build):
    out, report = smoke_build
    assert json.loads((out / REPORT).read_text()) == json.loads(json.dumps(report))
    stages = report["stages"]
    assert list(stages) == ["tokenizer", "clip", "lm", "vae", "unet", "data", "fromage", "gill"]
    assert all(s["seconds"] > 0 for s in stages.values())
    assert stages["fromage"]["train_steps"] == stages["gill"]["train_steps"] == pretrain.Recipe.smoke().method_steps
    assert 0 <= stages["gill"]["decision_train_accuracy"] <= 1
    assert 0 <= stages["clip"]["retrieval_R@1"] <= stages["clip"]["retrieval_R@10"] <= 1
    assert stages["lm"]["test_perplexity"] > 1
    assert (out / "diffusion_samples.png").is_file() and (out / "vae_recon.png").is_file()


def _weights(root) -> dict:
    from safetensors.torch import load_file

    return {str(f.relative_to(root)): load_file(f) for f in sorted(root.rglob("*.safetensors"))}


def test_a_parallel_build_gives_the_weights_of_a_sequential_one(smoke_build, tmp_path):
    """--jobs 2 runs independent stages in two processes; each stage seeds itself, so with one thread per stage
    every weight file (backbones, trained layers, gallery embeddings) is the one-job build's, bit for bit."""
    out, report = smoke_build
    parallel = build(tmp_path / "toy", recipe=pretrain.Recipe.smoke(), threads=1, n_data=48, jobs=2)
    assert list(parallel["stages"]) == list(report["stages"])  # listed in build order, whatever finished first
    assert all(s["threads"] == 1 for s in parallel["stages"].values())
    ours, theirs = _weights(out.parent), _weights(tmp_path)
    assert set(ours) == set(theirs) and len(ours) >= 8
    for name, tensors in ours.items():
        assert tensors.keys() == theirs[name].keys(), name
        assert all(torch.equal(t, theirs[name][k]) for k, t in tensors.items()), name
    assert sorted(p.name for p in (tmp_path / "toy" / "logs").iterdir()) == sorted(f"{s}.log" for s in report["stages"])


def test_a_failed_stage_in_a_parallel_build_names_itself_and_its_log(tmp_path):
    (tmp_path / "toy" / "clip").mkdir(parents=True)
    (tmp_path / "toy" / "clip" / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(RuntimeError, match=r"stage clip failed \(exit code 1\); the end of .*clip\.log:\n(.|\n)*Error"):
        build(tmp_path / "toy", stages=["clip"], recipe=pretrain.Recipe.smoke(), jobs=2, threads=1)


def test_backbones_load_with_the_project_loaders(smoke_build):
    out, _ = smoke_build
    tok = load_tokenizer(LMSpec(source=str(out / "lm")))
    ids = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("</s>")  # OPT convention: BOS first
    assert tok.decode(ids[1:]) == "a red circle"
    lm = load_lm(LMSpec(source=str(out / "lm")), tok, dtype=torch.float32, device="cpu")
    assert lm.config.vocab_size == len(tok)

    vision = load_vision(VisionSpec(backend="hf_clip", source=str(out / "clip")), dtype=torch.float32, device="cpu")
    image = W.scenes(1, split="test", seed=0)[0].render()
    expected = pretrain.clip_pixels(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None])
    assert torch.equal(vision.processor([image]), expected)  # the CLIP was trained on what the loader feeds it

    sd = load_diffusion(
        DiffusionSpec(source=str(out / "diffusion"), safety_checker=False), tok, dtype=torch.float32, device="cpu"
    )
    assert sd.tokenizer("a red circle").input_ids[-1] == sd.tokenizer.eos_token_id  # CLIP pools at EOS
    assert sd.tokenizer.model_max_length == pretrain.Recipe.smoke().text_length
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(out / "clip")
    encoder = sd.text_encoder.state_dict()
    for name, value in clip.text_model.state_dict().items():  # the diffusion is conditioned on the CLIP's text tower
        assert torch.equal(encoder.get(name, encoder.get(f"text_model.{name}")), value), name


def test_a_stage_without_its_inputs_says_what_to_run(tmp_path):
    out = tmp_path / "toy"
    with pytest.raises(FileNotFoundError, match="--stage tokenizer --stage clip --stage vae"):
        build(out, stages=["unet"], recipe=pretrain.Recipe.smoke())
    with pytest.raises(ValueError, match="unknown --stage"):
        build(out, stages=["bogus"], recipe=pretrain.Recipe.smoke())
    with pytest.raises(ValueError, match="--jobs must be >= 1, got 0"):
        build(out, jobs=0, recipe=pretrain.Recipe.smoke())
    assert not out.exists()  # a refused build writes nothing


def test_repo_paths_resolve_inside_the_checkout():
    import fromage_gill

    assert checkout_path("repo:fromage_gill") == str(__import__("pathlib").Path(fromage_gill.__file__).resolve().parent)
    assert checkout_path("facebook/opt-6.7b") == "facebook/opt-6.7b"
    assert checkout_path(None) is None
    with pytest.raises(FileNotFoundError, match="fromage-gill toy build"):
        checkout_path("repo:checkpoints/no-such-thing")
    # and back: what identifies a model (its index fingerprint) is the same in every clone
    from fromage_gill.paths import portable_source

    assert portable_source(checkout_path("repo:checkpoints/toy/clip", must_exist=False)) == "repo:checkpoints/toy/clip"
    assert portable_source("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    assert portable_source("random") == "random" and portable_source("/elsewhere/clip") == "/elsewhere/clip"


def test_data_stage_alone_exports_training_data_only(tmp_path):
    report = build(tmp_path / "toy", stages=["data"], recipe=pretrain.Recipe.smoke(), n_data=6)
    assert list(report["stages"]) == ["data"]
    assert not (tmp_path / "toy" / "clip").exists()  # no pretraining stage ran
    rows = (tmp_path / "toy-data" / "train" / "captions.tsv").read_text().splitlines()
    # half the images get a chat-worded query, half are captioned as the answer to a chat question (the prompt)
    assert rows[0] == "caption\timage\tquery\tprompt" and len(rows) == 7
    from fromage_gill.training.decision import read_decision_data

    prompts, labels = read_decision_data(tmp_path / "toy-data" / "decision_train.tsv")
    assert set(labels) == {0, 1} and len(prompts) == 2000 and all("\nA: " in p for p in prompts)


def test_method_stage_writes_loadable_models_and_their_gallery_indexes(smoke_build):
    """toy-fromage / toy-gill trained by `fromage-gill train` load with load_pipeline, and each gallery index was
    embedded by its own model (the app refuses an index of another model)."""
    from fromage_gill.pipeline import load_pipeline
    from fromage_gill.retrieve import ImageIndex

    out, _ = smoke_build
    for name in ("toy-fromage", "toy-gill"):
        pipe = load_pipeline(out.parent / name, device="cpu", dtype="fp32", load_diffusion_pipeline=False)
        assert pipe.config.name == name and pipe.config.lm.source == str(out / "lm")
        index = ImageIndex.load(out.parent / "indexes" / name, expected_fingerprint=pipe.model.retrieval_fingerprint())
        assert len(index) == pretrain.Recipe.smoke().gallery_images
        assert index.load_image(0).size == (W.IMAGE_SIZE, W.IMAGE_SIZE)
    assert (out.parent / "toy-data" / "runs" / "toy-gill.json").is_file()  # the --model the run was trained with


def test_method_stage_without_data_says_what_to_run(tmp_path):
    (tmp_path / "toy" / "clip").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="needs the output of tokenizer, clip, lm, data"):
        build(tmp_path / "toy", stages=["fromage"], recipe=pretrain.Recipe.smoke())
