"""The training loop on the tiny presets: frozen parts untouched, checkpoints loadable and resumable, errors early."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from fromage_gill import load_pipeline
from fromage_gill.checkpoint import read_native
from fromage_gill.training.checkpoints import CHECKPOINTS
from fromage_gill.training.data import DataError, read_records
from fromage_gill.training.loop import TrainConfig, train
from fromage_gill.training.precompute import PrecomputedStore, precompute, shard_path
from fromage_gill.training.synthetic import make_shapes


@pytest.fixture(autouse=True)
def one_thread():
    # The CI machine has 2 shared cores: tiny matrices run faster on one thread than fighting over two.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 40, fmt="tsv")


def run(data, out, **kw) -> object:
    kw.setdefault("model", "tiny-fromage")
    kw.setdefault("max_steps", 4)
    kw.setdefault("batch_size", 8)
    kw.setdefault("warmup", 0)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("progress", False)
    kw.setdefault("tensorboard", False)
    return train(TrainConfig(data=str(data), out=str(out), **kw))


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_trains_only_the_trained_layers_and_writes_a_loadable_run(shapes, tmp_path):
    before = load_pipeline("tiny-fromage", device="cpu", dtype="fp32").model
    res = run(shapes, tmp_path / "run", max_steps=4, save_every=2, tensorboard=True)
    m = res.model
    assert digest(m.lm) == digest(before.lm) and digest(m.vision) == digest(before.vision)  # bit-identical
    changed = [k for k, v in m.trained_state_dict().items() if not torch.equal(v, before.trained_state_dict()[k])]
    assert set(changed) == {
        "visual_embeddings.weight",
        "visual_embeddings.bias",
        "visual_fc.weight",
        "visual_fc.bias",
        "text_fc.weight",
        "text_fc.bias",
        "logit_scale",
        "image_token_embeddings",
    }
    # OUT/ loads like any model; its trained layers are those of the last step
    loaded = load_pipeline(tmp_path / "run", device="cpu", dtype="fp32").model
    for k, v in m.trained_state_dict().items():
        assert torch.equal(loaded.trained_state_dict()[k], v), k
    ckpts = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir())
    assert ckpts == ["step-0000002", "step-0000004"]  # no temporary directory left behind
    assert list((tmp_path / "run" / "logs").iterdir())  # TensorBoard events
    assert [v["step"] for v in res.validation] == [0, 4]
    assert {"caption", "retrieval_lm", "contrastive", "caption_acc", "R@1", "R@5", "R@10"} <= set(res.validation[-1])
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in res.history)


def test_resume_continues_the_same_curve(shapes, tmp_path):
    # warm-up and gradient accumulation included: the scheduler and the data position must resume too
    kw = dict(save_every=3, model="tiny-gill", batch_size=4, lr=3e-3, warmup=4, grad_accum=2)
    straight = run(shapes, tmp_path / "a", max_steps=6, **kw)
    first = run(shapes, tmp_path / "b", max_steps=3, **kw)
    second = run(shapes, tmp_path / "b", max_steps=6, resume=str(tmp_path / "b"), **kw)
    assert [h["lr"] for h in straight.history] == pytest.approx([3e-3 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])
    curve = [h["total"] for h in first.history + second.history]
    assert curve == pytest.approx([h["total"] for h in straight.history], rel=1e-5, abs=1e-6)
    assert len(set(curve)) > 1  # it moved: the comparison is not between constants
    # the published renormalisation: every [IMG] row keeps the mean norm of the LM's own embedding rows
    m = straight.model
    base = m.lm.get_input_embeddings().weight[: m.n_base].norm(dim=-1).mean()
    torch.testing.assert_close(m.image_token_embeddings.norm(dim=-1), base.expand(8), rtol=1e-5, atol=1e-6)
    a = read_native(tmp_path / "a" / "model.safetensors")
    b = read_native(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_run_killed_while_saving_leaves_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):
        if "step-0000004" in str(path) and str(path).endswith("trainer_state.pt"):
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(shapes, tmp_path / "run", max_steps=4, save_every=2)
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = tmp_path / "run" / CHECKPOINTS
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-0000004", "step-0000002"]
    good = read_native(ckpts / "step-0000002" / "model.safetensors")
    for where in (ckpts / "step-0000002", tmp_path / "run"):  # both load, and hold the step-2 weights
        model = load_pipeline(where, device="cpu", dtype="fp32").model
        for k, v in good.items():
            assert torch.equal(model.trained_state_dict()[k], v), (where, k)
    res = run(shapes, tmp_path / "run", max_steps=4, save_every=2, resume=str(tmp_path / "run"))
    assert res.step == 4 and len(res.history) == 2  # continued from step 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]


def test_unreadable_images_are_skipped_and_counted_even_whole_batches(tmp_path):
    data = make_shapes(tmp_path / "d", 8, fmt="tsv")
    for i in range(2, 8):  # 6 of 8 broken: with batches of 2, at least two micro-batches have no usable image
        (tmp_path / "d" / "images" / f"{i:05d}.png").write_bytes(b"broken")
    res = run(data, tmp_path / "run", max_steps=4, batch_size=2, val_fraction=0.0)
    assert res.step == 4 and res.skipped == 6  # one epoch: every broken image met once, none replaced
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in res.history)
    assert sum("caption" in h for h in res.history) <= 2  # steps without a usable image train nothing


@pytest.mark.parametrize("lm_type", ["llama", "opt"])
def test_other_lms_untied_embeddings_missing_pad_and_chat_template(tmp_path, shapes, lm_type):
    from fromage_gill.backbones import train_tiny_tokenizer

    tok = train_tiny_tokenizer(512)
    tok.pad_token = None  # like LLaMA / Mistral: no pad token
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    tok.save_pretrained(tmp_path / "tok")
    lm = (
        {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        }
        if lm_type == "llama"
        else {
            "model_type": "opt",
            "vocab_size": 512,
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "num_hidden_layers": 2,
            "ffn_dim": 128,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "dropout": 0.0,
            "tie_word_embeddings": False,
        }
    )
    base = json.loads(_preset_path("tiny-fromage").read_text())
    base.update(name=f"tiny-{lm_type}", lm={"source": "random", "config": lm, "tokenizer": str(tmp_path / "tok")})
    (tmp_path / "cfg.json").write_text(json.dumps(base))
    res = run(shapes, tmp_path / "run", model=str(tmp_path / "cfg.json"), max_steps=3, lr=3e-3)
    m = res.model
    assert not m.tied and m.image_token_output is not None
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in res.history)
    fresh = load_pipeline(str(tmp_path / "cfg.json"), device="cpu", dtype="fp32", weights="random").model
    # the untied output row of [RET] is trained (it decides when the LM emits [RET])
    assert not torch.equal(m.image_token_output, fresh.image_token_output)
    assert res.history[-1]["retrieval_lm"] < res.history[0]["retrieval_lm"]
    # the untied output row is kept at the mean norm of the LM's output rows, the input row at the input rows'
    out_norm = m.lm.get_output_embeddings().weight[: m.n_base].norm(dim=-1).mean()
    in_norm = m.lm.get_input_embeddings().weight[: m.n_base].norm(dim=-1).mean()
    torch.testing.assert_close(m.image_token_output.norm(dim=-1), out_norm.expand(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.image_token_embeddings.norm(dim=-1), in_norm.expand(1), rtol=1e-5, atol=1e-6)


def _preset_path(name: str):
    from importlib import resources

    return resources.files("fromage_gill") / "presets" / f"{name}.json"


# ------------------------------------------------------------------------------------------------ bad input


def _assert_nothing_written(out):
    assert not out.exists(), f"a failed run left {sorted(p.name for p in out.iterdir())}"


def test_bad_input_fails_before_writing(shapes, tmp_path):
    out = tmp_path / "out"
    no_caption = tmp_path / "nocap.tsv"
    no_caption.write_text("image\nimages/00000.png\n")
    with pytest.raises(DataError, match="no caption column"):
        run(no_caption, out)
    _assert_nothing_written(out)
    with pytest.raises(FileNotFoundError, match="--image-root"):
        run(shapes, out, image_root=str(tmp_path / "does-not-exist"))
    _assert_nothing_written(out)
    empty = tmp_path / "empty.tsv"
    empty.write_text("caption\timage\n")
    with pytest.raises(DataError, match="no usable"):
        run(empty, out)
    _assert_nothing_written(out)
    with pytest.raises(DataError, match="fewer than one batch"):
        run(shapes, out, batch_size=64)
    _assert_nothing_written(out)


def test_token_ids_beyond_the_vocabulary_are_refused(shapes, tmp_path):
    from fromage_gill.backbones import train_tiny_tokenizer

    train_tiny_tokenizer(512).save_pretrained(tmp_path / "tok")  # 512 tokens for an LM with 300 rows
    base = json.loads(_preset_path("tiny-fromage").read_text())
    base["lm"] = {
        "source": "random",
        "tokenizer": str(tmp_path / "tok"),
        "config": {**base["lm"]["config"], "vocab_size": 300},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(base))
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the LM's embedding matrix only 300"):
        run(shapes, tmp_path / "out", model=str(tmp_path / "cfg.json"))
    _assert_nothing_written(tmp_path / "out")


def test_resume_from_another_model_is_refused(shapes, tmp_path):
    run(shapes, tmp_path / "fromage", max_steps=1)
    out = tmp_path / "gill"
    with pytest.raises(ValueError, match="written by another model .*tiny-fromage"):
        run(shapes, out, model="tiny-gill", resume=str(tmp_path / "fromage"))
    _assert_nothing_written(out)
    with pytest.raises(FileExistsError, match="--resume"):  # an existing run is never overwritten silently
        run(shapes, tmp_path / "fromage", max_steps=1)


def test_cli_errors_are_user_errors(tmp_path):
    import argparse

    from fromage_gill.commands import train as train_command

    # Only this sub-command is registered: the full CLI imports every helper's commands.
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train",
            "--model",
            "tiny-fromage",
            "--data",
            str(tmp_path / "none.tsv"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    with pytest.raises(FileNotFoundError, match="--data .*none.tsv does not exist"):  # cli.main prints it as one line
        args.func(args)
    _assert_nothing_written(tmp_path / "o")


def test_cli_caption_end_reads_escapes_as_typed_in_a_shell():
    import argparse

    from fromage_gill.commands import train as train_command

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    base = ["train", "--model", "tiny-fromage", "--data", "d.tsv", "--out", "o"]
    assert parser.parse_args(base).caption_end == ""
    assert parser.parse_args([*base, "--caption-end", "\\n"]).caption_end == "\n"  # what '\n' in a shell passes
    assert parser.parse_args([*base, "--caption-end", "</turn>\\t"]).caption_end == "</turn>\t"


# ------------------------------------------------------------------------------------------------ precompute


def test_precompute_matches_on_the_fly_and_resumes(tmp_path):
    data = make_shapes(tmp_path / "d", 24, fmt="tsv")
    (tmp_path / "d" / "images" / "00005.png").write_bytes(b"broken")
    recs = read_records(data)
    pipe = load_pipeline("tiny-gill", device="cpu", dtype="fp32")
    res = precompute(pipe, recs, tmp_path / "pre", batch_size=5, shard_size=10, progress=False)
    assert (res.n_records, res.n_written, res.n_skipped, res.shards_computed) == (24, 23, 1, 3)
    store = PrecomputedStore(tmp_path / "pre")
    assert store.get(5) is None  # the unreadable image has no row
    from fromage_gill.training.data import load_record_image
    from fromage_gill.training.precompute import encode_captions_for_diffusion

    row = store.get(7)
    with torch.no_grad():
        feats = pipe.model.encode_images(pipe.image_processor([load_record_image(recs.items[7])]))
    torch.testing.assert_close(row["features"], feats[0])
    torch.testing.assert_close(
        row["text_cond"], encode_captions_for_diffusion(pipe.diffusion, [recs.items[7].caption])[0]
    )
    # resumable: only the missing shard is computed again
    shard_path(tmp_path / "pre", 1).unlink()
    again = precompute(pipe, recs, tmp_path / "pre", batch_size=5, shard_size=10, progress=False)
    assert again.shards_computed == 1 and again.n_written == 23

    # training from precomputed features follows the same curve as encoding on the fly
    kw = dict(model="tiny-gill", max_steps=3, batch_size=4, lr=3e-3, val_fraction=0.2)
    fly = run(data, tmp_path / "fly", **kw)
    pre = run(data, tmp_path / "prec", precomputed=str(tmp_path / "pre"), **kw)
    assert [h["total"] for h in pre.history] == pytest.approx([h["total"] for h in fly.history], rel=1e-4)
    # ... and refuses features of other data
    other = make_shapes(tmp_path / "other", 30, fmt="tsv")
    with pytest.raises(DataError, match="other data"):
        run(other, tmp_path / "x", precomputed=str(tmp_path / "pre"), **kw)
    _assert_nothing_written(tmp_path / "x")


# ------------------------------------------------------------------------------------------------ decision head


def test_decision_head_trains_alone_on_labelled_prompts(tmp_path):
    import argparse

    from fromage_gill.commands import train as train_command
    from fromage_gill.training.decision import read_decision_data

    subjects = ["cat", "dog", "house", "tree", "boat", "car", "bird", "flower"]
    lines = ["prompt\tlabel"]
    lines += [f"show me a photo of a {s}\tretrieve" for s in subjects]
    lines += [f"imagine and draw a {s} made of glass\tgenerate" for s in subjects]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    prompts, labels = read_decision_data(tmp_path / "d.tsv")
    assert labels == [1] * 8 + [0] * 8 and prompts[0] == "show me a photo of a cat"

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train",
            "--model",
            "tiny-gill",
            "--decision-data",
            str(tmp_path / "d.tsv"),
            "--out",
            str(tmp_path / "out"),
            "--max-steps",
            "150",
            "--lr",
            "1e-2",
            "--cpu",
        ]
    )
    assert args.func(args) == 0
    before = load_pipeline("tiny-gill", device="cpu", dtype="fp32").model.trained_state_dict()
    after = read_native(tmp_path / "out" / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"decision.1.weight", "decision.1.bias"}
    model = load_pipeline(tmp_path / "out", device="cpu", dtype="fp32", load_diffusion_pipeline=False)
    from fromage_gill.training.decision import img0_hidden

    probs = model.model.decide(img0_hidden(model.model, model.tokenizer, prompts))
    assert (probs.argmax(-1) == torch.tensor(labels)).float().mean() == 1.0  # separable by wording

    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\tlabel\na cat\tmaybe\n")
    with pytest.raises(DataError, match="line 2.*maybe"):
        read_decision_data(bad)


def test_decision_head_reads_what_inference_reads(tiny_gill):
    """The head's training input is the [IMG0] state that generation computes for the same text (only prompts
    over max_tokens differ: training cuts them)."""
    from fromage_gill.generate import image_token_states
    from fromage_gill.training.decision import img0_hidden

    prompts = ["show me a photo of a cat", "imagine and draw a boat made of glass", "a dog"]
    expected = image_token_states(tiny_gill, prompts)[:, 0].float()
    assert torch.equal(img0_hidden(tiny_gill.model, tiny_gill.tokenizer, prompts), expected)
    ids = tiny_gill.tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    cut = img0_hidden(tiny_gill.model, tiny_gill.tokenizer, prompts[1:2], max_tokens=len(ids) - 2)
    assert not torch.equal(cut, expected[1:2])


# ------------------------------------------------------------------------------------------------ the objective


def _objective(pipe, accelerator, **kw):
    from fromage_gill.training.losses import LossWeights
    from fromage_gill.training.objective import Objective

    return Objective(
        pipe.model,
        pipe.tokenizer,
        weights=LossWeights(),
        max_caption_tokens=32,
        accelerator=accelerator,
        diffusion=pipe.diffusion,
        **kw,
    )


class _OneProcess:
    num_processes, process_index = 1, 0


def _direct_caption_loss(pipe, feats: torch.Tensor, targets: list[list[int]]) -> tuple[float, int]:
    """Mean cross-entropy of each row [visual; BOS; targets] over its target tokens, one example at a time."""
    import torch.nn.functional as F

    m, tok = pipe.model, pipe.tokenizer
    losses, n_tokens = [], 0
    for i, ids in enumerate(targets):
        emb = torch.cat([m.visual_tokens(feats[i : i + 1])[0], m.embed_tokens(torch.tensor([tok.bos_token_id] + ids))])
        logits = m.forward_lm(emb[None]).logits[0]
        # position n_visual (BOS) predicts ids[0], ...; the visual and BOS targets are not predicted
        losses.append(F.cross_entropy(logits[m.config.n_visual_tokens : -1], torch.tensor(ids), reduction="sum"))
        n_tokens += len(ids)
    return (sum(losses) / n_tokens).item(), n_tokens


def test_caption_loss_is_cross_entropy_on_caption_tokens_only(tiny_fromage):
    """Parity with a direct computation: one example, [visual; BOS; caption], targets = the caption tokens."""
    m, tok = tiny_fromage.model, tiny_fromage.tokenizer
    obj = _objective(tiny_fromage, _OneProcess())
    feats = torch.randn(2, m.vision.out_dim, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle on a table", "blue"]  # different lengths: the second row is padded
    with torch.no_grad():
        parts = obj.local_parts(feats, captions, None, concat=False)
        loss, n_tokens = _direct_caption_loss(
            tiny_fromage, feats, [tok(c, add_special_tokens=False)["input_ids"] for c in captions]
        )
    assert parts["caption"].item() == pytest.approx(loss, rel=1e-5)
    assert parts["caption_counted"].item() == n_tokens


def test_caption_end_is_a_target_after_every_caption_and_nowhere_else(tiny_gill):
    """--caption-end: the captioning targets are each caption's tokens then the end's (direct computation); the
    retrieval and generation parts do not change."""
    m, tok = tiny_gill.model, tiny_gill.tokenizer
    plain, ended = _objective(tiny_gill, _OneProcess()), _objective(tiny_gill, _OneProcess(), caption_end="\n")
    end = tok("\n", add_special_tokens=False)["input_ids"]
    assert ended.caption_end_ids == end and end
    feats = torch.randn(2, m.vision.out_dim, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle on a table", "blue"]
    with torch.no_grad():
        before, after = plain.local_parts(feats, captions, None, False), ended.local_parts(feats, captions, None, False)
        loss, n_tokens = _direct_caption_loss(
            tiny_gill, feats, [tok(c, add_special_tokens=False)["input_ids"] + end for c in captions]
        )
    assert after["caption"].item() == pytest.approx(loss, rel=1e-5)
    assert after["caption_counted"].item() == n_tokens == before["caption_counted"].item() + 2 * len(end)
    for k in ("retrieval_lm", "text_emb", "image_emb", "generation"):
        assert torch.equal(after[k], before[k]), k


def test_a_prompt_is_read_before_the_caption_but_never_a_target(tiny_gill):
    """With a prompt, the captioning targets are the caption's tokens as they follow the prompt in one text
    (direct computation: [visual; BOS; prompt; caption], loss on the caption only); rows without a prompt and the
    retrieval and generation parts are unchanged."""
    import torch.nn.functional as F

    m, tok = tiny_gill.model, tiny_gill.tokenizer
    obj = _objective(tiny_gill, _OneProcess())
    feats = torch.randn(2, m.vision.out_dim, generator=torch.Generator().manual_seed(2))
    captions, prompt = ["a red circle", "a blue square on a table"], "Q: What is in this image?\nA:"
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(prompt + " " + captions[0], add_special_tokens=False)["input_ids"]
    assert whole[: len(head)] == head and obj.prompted(prompt, captions[0]) == (head, whole[len(head) :])
    with torch.no_grad():
        plain = obj.local_parts(feats, captions, None, False)
        asked = obj.local_parts(feats, captions, None, False, prompts=[prompt, ""])
        emb = torch.cat([m.visual_tokens(feats[:1])[0], m.embed_tokens(torch.tensor([tok.bos_token_id] + whole))])
        logits = m.forward_lm(emb[None]).logits[0]
        start = m.config.n_visual_tokens + len(head)  # the last prompt token predicts the caption's first
        first = F.cross_entropy(logits[start:-1], torch.tensor(whole[len(head) :]), reduction="sum")
        second, n_second = _direct_caption_loss(
            tiny_gill, feats[1:], [tok(captions[1], add_special_tokens=False)["input_ids"]]
        )
    n_first = len(whole) - len(head)
    assert asked["caption_counted"].item() == n_first + n_second
    assert asked["caption"].item() == pytest.approx((first.item() + second * n_second) / (n_first + n_second), rel=1e-5)
    for k in ("retrieval_lm", "text_emb", "image_emb", "generation"):
        assert torch.equal(asked[k], plain[k]), k


def test_a_history_is_read_before_the_image_and_the_query_but_never_a_target(tiny_gill):
    """With a history, the captioning targets are the caption's tokens after [BOS; history; visual] and the
    image-token states those after [BOS; history; query] (direct computations); a row without one is as before."""
    import torch.nn.functional as F

    m, tok = tiny_gill.model, tiny_gill.tokenizer
    obj = _objective(tiny_gill, _OneProcess())
    feats = torch.randn(2, m.vision.out_dim, generator=torch.Generator().manual_seed(3))
    captions, history = ["a red circle", "a blue square on a table"], "Q: Draw a ring.\nA: here is a ring.\n"
    h = tok(history, add_special_tokens=False)["input_ids"]
    cap = tok(captions[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        plain = obj.local_parts(feats, captions, None, False)
        later = obj.local_parts(feats, captions, None, False, histories=[history, ""])
        bos = m.embed_tokens(torch.tensor([tok.bos_token_id]))
        emb = torch.cat(
            [bos, m.embed_tokens(torch.tensor(h)), m.visual_tokens(feats[:1])[0], m.embed_tokens(torch.tensor(cap))]
        )
        logits = m.forward_lm(emb[None]).logits[0]
        start = 1 + len(h) + m.config.n_visual_tokens - 1  # the last visual token predicts the caption's first
        first = F.cross_entropy(logits[start:-1], torch.tensor(cap), reduction="sum")
        second, n_second = _direct_caption_loss(
            tiny_gill, feats[1:], [tok(captions[1], add_special_tokens=False)["input_ids"]]
        )
        row = torch.tensor([[tok.bos_token_id, *h, *cap, *m.image_token_ids]])
        states = m(row, torch.ones_like(row), logits="none").hidden[0, 1 + len(h) + len(cap)]
    assert later["caption_counted"].item() == len(cap) + n_second == plain["caption_counted"].item()
    assert later["caption"].item() == pytest.approx(
        (first.item() + second * n_second) / (len(cap) + n_second), rel=1e-5
    )
    torch.testing.assert_close(later["text_emb"][0], m.text_embedding(states[None])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(later["text_emb"][1], plain["text_emb"][1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(later["text_emb"][0], plain["text_emb"][0])


def test_caption_end_that_the_loss_cannot_supervise_is_refused(tiny_gill):
    eos = tiny_gill.tokenizer.eos_token
    with pytest.raises(ValueError, match="--caption-end.*cannot supervise"):
        _objective(tiny_gill, _OneProcess(), caption_end=eos)


def test_queries_replace_the_caption_only_where_the_image_tokens_read_it(tiny_gill):
    """With queries, the retrieval parts (image-token LM loss, [IMG0] embedding) are those of the queries as
    captions, the captioning loss is the captions', and the generation target stays the captions' encoding."""
    from fromage_gill.training.precompute import encode_captions_for_diffusion

    m = tiny_gill.model
    obj = _objective(tiny_gill, _OneProcess())
    feats = torch.randn(2, m.vision.out_dim, generator=torch.Generator().manual_seed(3))
    captions, queries = ["a red circle", "a blue square on a table"], ["here is a red circle.", "a blue square"]
    with torch.no_grad():
        plain = obj.local_parts(feats, captions, None, False)
        same = obj.local_parts(feats, captions, None, False, queries=list(captions))
        asked = obj.local_parts(feats, captions, None, False, queries=queries)
        as_captions = obj.local_parts(
            feats, queries, encode_captions_for_diffusion(tiny_gill.diffusion, captions), False
        )
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert torch.equal(asked["caption"], plain["caption"])
    for k in ("retrieval_lm", "text_emb", "generation"):
        assert torch.allclose(asked[k], as_captions[k], atol=1e-6), k
        assert not torch.allclose(asked[k], plain[k], atol=1e-4), k


class _TwoProcesses:
    """Process 0 of 2; the other process holds ``other`` rows. Mimics accelerate's gather (concatenate in rank
    order, equal shapes required)."""

    num_processes, process_index = 2, 0

    def __init__(self, other_text, other_image):
        self.pending = [other_text, other_image]

    def gather(self, t):
        if t.dtype == torch.long:  # the row counts
            return torch.tensor([t.item(), self.pending[0].shape[0]])
        other = self.pending.pop(0)
        pad = torch.zeros(t.shape[0] - other.shape[0], *t.shape[1:])
        return torch.cat([t, torch.cat([other, pad])])


def test_objective_contrasts_against_other_processes_rows(tiny_fromage):
    import torch.nn.functional as F

    from fromage_gill.training.losses import contrastive_loss

    m = tiny_fromage.model
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, m.vision.out_dim, generator=g)
    other_text = F.normalize(torch.randn(2, m.config.retrieval_dim, generator=g), dim=-1)
    other_image = F.normalize(torch.randn(2, m.config.retrieval_dim, generator=g), dim=-1)
    captions = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        local = _objective(tiny_fromage, _OneProcess()).local_parts(feats, captions, None, concat=False)
        out = _objective(tiny_fromage, _TwoProcesses(other_text, other_image))(feats, captions, None, False)
    expected = contrastive_loss(
        torch.cat([local["text_emb"], other_text]), torch.cat([local["image_emb"], other_image]), m.logit_scale
    )
    alone = contrastive_loss(local["text_emb"], local["image_emb"], m.logit_scale)
    assert out["contrastive"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(out["contrastive"].item() - alone.item()) > 1e-3


def test_precompute_command(tmp_path):
    import argparse

    from fromage_gill.commands import precompute as precompute_command

    data = make_shapes(tmp_path / "d", 6, fmt="folder")
    parser = argparse.ArgumentParser()
    precompute_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "precompute",
            "--model",
            "tiny-fromage",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "pre"),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    store = PrecomputedStore(tmp_path / "pre")
    assert len(store) == 6 and store.meta["text"] is False


def test_precomputed_store_survives_pickling_for_worker_processes(tmp_path):
    import pickle

    data = make_shapes(tmp_path / "d", 5, fmt="tsv")
    pipe = load_pipeline("tiny-fromage", device="cpu", dtype="fp32")
    precompute(pipe, read_records(data), tmp_path / "pre", shard_size=2, progress=False)
    store = PrecomputedStore(tmp_path / "pre")
    copy = pickle.loads(pickle.dumps(store))
    for i in range(5):
        assert torch.equal(copy.get(i)["features"], store.get(i)["features"])


def test_training_a_magic_model_is_refused_before_anything_is_read(tmp_path):
    # MAGIC has no trained layers; its config has no weights to start from (was an AttributeError on .weights).
    from fromage_gill.config import ConfigError

    with pytest.raises(ConfigError, match="tiny-magic is a MAGIC model: .*nothing to train; pick a FROMAGe or GILL"):
        train(TrainConfig(model="tiny-magic", data=str(tmp_path / "none.tsv"), out=str(tmp_path / "o")))
    _assert_nothing_written(tmp_path / "o")
