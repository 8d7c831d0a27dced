"""SimCTG objective (hand-computed values, parity with the published formulation) and the train-lm loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fromage_gill.cli import main
from fromage_gill.magic.simctg import (
    CorpusError,
    SimCTGConfig,
    batch_indices,
    collate,
    contrastive_token_loss,
    read_captions,
    simctg_loss,
    train_lm,
)

S = math.sqrt(0.5)  # cos 45 degrees


def test_contrastive_loss_hand_computed():
    # Sequence A, 3 real tokens: cosines (0,1)=0, (0,2)=(1,2)=sqrt(1/2). Sequence B: 2 real tokens at 45 degrees,
    # then a pad whose state equals token 0's (cosine 1: a loss of 0.5 per pair if it were not masked).
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [3.0, 3.0], [2.0, 0.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # relu(margin - (1 - s)) = relu(s - 0.5): 0 for s=0, sqrt(1/2) - 0.5 for s=sqrt(1/2); 6 + 2 ordered pairs.
    expected = (2 * (0 + 2 * (S - 0.5)) + 2 * (S - 0.5)) / 8
    assert expected == pytest.approx(0.1553301, abs=1e-6)
    assert contrastive_token_loss(hidden, mask, margin=0.5).item() == pytest.approx(expected, abs=1e-6)
    # with margin 0.2 no pair is within the margin: relu(sqrt(1/2) - 0.8) = 0
    assert contrastive_token_loss(hidden, mask, margin=0.2).item() == pytest.approx(0.0, abs=1e-7)
    # margin 1.0: relu(s) summed: (2 * 2 * S + 2 * S) / 8
    assert contrastive_token_loss(hidden, mask, margin=1.0).item() == pytest.approx(6 * S / 8, abs=1e-6)


def test_simctg_loss_is_mle_plus_contrastive():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 2.0
    labels = torch.tensor([[2, 1, -100]])
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    parts = simctg_loss(logits, hidden, labels, mask, margin=0.5)
    # CE: -log(e^2 / (e^2 + 3)) for the first position, log 4 for the second (uniform); the third is ignored
    mle = (math.log(1 + 3 * math.exp(-2)) + math.log(4)) / 2
    assert parts["mle"].item() == pytest.approx(mle, abs=1e-6)
    assert parts["contrastive"].item() == pytest.approx(S - 0.5, abs=1e-6)
    assert parts["total"].item() == pytest.approx(mle + S - 0.5, abs=1e-6)


def published_contrastive_loss(margin, score_matrix, input_ids, pad_token_id):
    """The SimCTG paper code's formulation (pad-id masking, mask matrix built per sequence), for parity."""
    bsz, seqlen, _ = score_matrix.size()
    gold = torch.diagonal(score_matrix, dim1=1, dim2=2).unsqueeze(-1)
    loss_matrix = torch.relu(margin - (gold - score_matrix))
    input_mask = (~input_ids.eq(pad_token_id)).float()
    masks = []
    for n in input_mask.sum(-1).long().tolist():
        m = torch.ones(seqlen, seqlen) - torch.eye(seqlen)
        m[:, n:] = 0
        m[n:, :] = 0
        masks.append(m)
    loss_mask = torch.stack(masks)
    per_token = (loss_matrix * loss_mask).sum(-1) * input_mask
    return per_token.sum() / loss_mask.sum()


def test_parity_with_the_published_formulation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    ids[1, 5:] = 0
    ids[2, 3:] = 0
    h = torch.nn.functional.normalize(hidden, dim=-1)
    ref = published_contrastive_loss(0.5, h @ h.transpose(1, 2), ids, pad_token_id=0)
    ours = contrastive_token_loss(hidden, (ids != 0).long(), margin=0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_collate_and_batches():
    inputs, labels, mask = collate([[7, 1, 2, 9], [7, 3, 9]], pad_id=0)
    assert inputs.tolist() == [[7, 1, 2], [7, 3, 0]]
    assert labels.tolist() == [[1, 2, 9], [3, 9, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # data order is a function of (seed, step): every example once per epoch
    epoch = [i for step in range(5) for i in batch_indices(10, 2, seed=3, step=step)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(10, 2, 3, 7) == batch_indices(10, 2, 3, 7)


@pytest.fixture
def captions(tmp_path):
    lines = [
        f"a {c} {o} on the {p}"
        for c in ("red", "blue", "small")
        for o in ("dog", "cat", "boat")
        for p in ("grass", "table")
    ]
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def corpus_loss(lm, tokenizer, path):
    from fromage_gill.magic.simctg import encode_captions

    start = tokenizer.convert_tokens_to_ids("<-start_of_text->")
    seqs = encode_captions(read_captions(path), tokenizer, start_id=start, eos_id=tokenizer.eos_token_id, max_len=64)
    inputs, labels, mask = collate(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = lm.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state
        return simctg_loss(lm.get_output_embeddings()(hidden), hidden, labels, mask)["total"].item()


def test_train_lm_learns_checkpoints_and_resumes_exactly(tmp_path, captions):
    from fromage_gill.backbones import load_lm, load_tokenizer
    from fromage_gill.config import LMSpec

    common = dict(model="tiny-magic", data=str(captions), batch_size=6, lr=3e-3, save_every=3, progress=False)
    full = train_lm(SimCTGConfig(out=str(tmp_path / "a"), max_steps=6, **common))
    assert full.step == 6 and [r["total"] for r in full.history] == pytest.approx(
        [r["mle"] + r["contrastive"] for r in full.history]
    )
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]  # complete ones only, no .tmp- left behind
    assert not list((tmp_path / "a").glob(".tmp*"))

    # the saved LM loads as a plain LM directory and fits the corpus better than where it started
    tok = load_tokenizer(LMSpec(source=str(tmp_path / "a")))
    trained = load_lm(LMSpec(source=str(tmp_path / "a")), tok, dtype=torch.float32, device="cpu")
    start_tok = load_tokenizer(LMSpec(source=str(tmp_path / "a" / "checkpoints" / "step-0000003")))
    assert tok.get_vocab() == start_tok.get_vocab() and "<-start_of_text->" in tok.get_vocab()
    half = load_lm(
        LMSpec(source=str(tmp_path / "a" / "checkpoints" / "step-0000003")), tok, dtype=torch.float32, device="cpu"
    )
    assert corpus_loss(trained, tok, captions) < corpus_loss(half, tok, captions)

    # 3 steps, then resumed to 6: the same weights as the uninterrupted run
    train_lm(SimCTGConfig(out=str(tmp_path / "b"), max_steps=3, **common))
    with pytest.raises(FileExistsError, match="--resume"):
        train_lm(SimCTGConfig(out=str(tmp_path / "b"), max_steps=6, **common))
    resumed = train_lm(SimCTGConfig(out=str(tmp_path / "b"), max_steps=6, resume=str(tmp_path / "b"), **common))
    assert resumed.step == 6 and len(resumed.history) == 3
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_train_lm_cli_and_errors(tmp_path, captions, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train-lm",
                "--model",
                "tiny-magic",
                "--data",
                str(captions),
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "trained to step 2" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "run.json").is_file()
    # the adapted LM captions through the same CLI
    from PIL import Image

    Image.new("RGB", (40, 30), (0, 90, 200)).save(tmp_path / "x.png")
    assert (
        main(["caption", str(tmp_path / "x.png"), "--model", "tiny-magic", "--lm", str(out), "--max-new-tokens", "3"])
        == 0
    )
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.png'}\t")

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CorpusError, match="no captions found"):
        read_captions(empty)
    assert main(["train-lm", "--model", "tiny-magic", "--data", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "no captions found" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="fewer than one batch"):
        train_lm(
            SimCTGConfig(
                model="tiny-magic", data=str(captions), out=str(tmp_path / "f"), batch_size=500, progress=False
            )
        )
    with pytest.raises(ValueError, match="train-lm fine-tunes a plain LM"):
        train_lm(SimCTGConfig(model="tiny-gill", data=str(captions), out=str(tmp_path / "g"), progress=False))
    with pytest.raises(ValueError, match="--margin must be in"):
        SimCTGConfig(model="tiny-magic", data="x", out="y", margin=0)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()  # nothing written on a bad input


def test_train_lm_logs_its_loss_curve_to_tensorboard(tmp_path, captions):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train-lm", "--model", "tiny-magic", "--data", str(captions), "--out", str(out), "--max-steps", "5"]
    assert main([*argv, "--batch-size", "4", "--log-every", "2", "--lr", "3e-3", "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["log_every"] == 2
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert {"train/total", "train/mle", "train/contrastive", "train/lr"} <= set(events.Tags()["scalars"])
    total = events.Scalars("train/total")
    assert [e.step for e in total] == [2, 4, 5]  # every --log-every steps, and the last
    assert all(math.isfinite(e.value) and e.value > 0 for e in total)
    mle, cl = events.Scalars("train/mle"), events.Scalars("train/contrastive")
    for t, m, c in zip(total, mle, cl, strict=True):  # the logged total is the two losses it sums
        assert t.value == pytest.approx(m.value + c.value, rel=1e-5)
