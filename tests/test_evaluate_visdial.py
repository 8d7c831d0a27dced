"""``fromage-gill eval visdial-t2i`` / ``visdial-rank`` / ``visdial-generation`` on a tiny VisDial v1.0 file and its
dense annotations, written here in the distributed format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fromage_gill as fg
from fromage_gill.cli import main
from fromage_gill.evaluate import EvalOptions, evaluate
from fromage_gill.evaluate.metrics import ndcg, rank_of
from fromage_gill.evaluate.readers import DataError, read_dense, read_visdial
from fromage_gill.evaluate.visdial_rank import round_context
from fromage_gill.evaluate.visdial_t2i import dialogue_text

N_OPTIONS = 6  # VisDial has 100; the protocol does not depend on how many


def write_visdial(root, n: int = 3, rounds: int = 2, missing: int | None = None):
    g = np.random.default_rng(1)
    questions = ["is it sunny", "how many people", "any animals", "what colour is the car"]
    answers = ["yes", "two", "no", "red", "maybe", "a dog", "three of them", "blue and white"]
    dialogs = []
    (root / "VisualDialog_val2018").mkdir(parents=True)
    for i in range(n):
        image_id = 185000 + i
        dialog = []
        for r in range(rounds):
            options = [(i + r + k) % len(answers) for k in range(N_OPTIONS)]
            gt = (i + 2 * r) % N_OPTIONS
            dialog.append({"question": (i + r) % 4, "answer": options[gt], "answer_options": options, "gt_index": gt})
        dialogs.append({"image_id": image_id, "caption": f"a photo {i}", "dialog": dialog})
        if image_id != missing:
            arr = g.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(
                root / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg"
            )
    data = {"version": "1.0", "split": "val", "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}
    (root / "visdial_1.0_val.json").write_text(json.dumps(data))
    dense = [
        {
            "image_id": 185000 + i,
            "round_id": 1 + i % rounds,
            "gt_relevance": [float((k * 7 + i) % 3) / 2 for k in range(N_OPTIONS)],
        }
        for i in range(n)
    ]
    (root / "dense.json").write_text(json.dumps(dense))
    return root / "visdial_1.0_val.json", root / "VisualDialog_val2018", root / "dense.json"


def test_visdial_readers_follow_the_distributed_format(tmp_path):
    data, _, dense = write_visdial(tmp_path)
    dialogs = read_visdial(data)
    assert dialogs[1].image_id == 185001 and dialogs[1].rounds[0].question == "how many people"
    assert len(dialogs[1].rounds[0].options) == N_OPTIONS and dialogs[1].rounds[0].gt_index == 1
    assert dialogue_text(dialogs[0]) == f"Q: is it sunny? A: {dialogs[0].rounds[0].answer}. Q: how many people? A: " + (
        f"{dialogs[0].rounds[1].answer}."
    )
    assert (
        round_context(dialogs[0], 1) == f"Q: is it sunny?\nA: {dialogs[0].rounds[0].answer}\nQ: how many people?\nA: "
    )
    assert read_dense(dense)[185001][0] == 1  # round_id is 1-based in VisDial: round 2 is index 1
    (tmp_path / "bad.json").write_text(json.dumps({"data": {"questions": [], "answers": []}}))
    with pytest.raises(DataError, match="data has no 'dialogs'"):
        read_visdial(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_visdial(tmp_path / "broken.json")


def test_visdial_t2i_ranks_every_dialogue_against_the_dialogues_images(tiny_gill, tmp_path):
    data, images, _ = write_visdial(tmp_path, n=4, missing=185003)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", batch_size=3, progress=False)
    report = evaluate("visdial-t2i", tiny_gill, opts, model_name="tiny-gill")
    assert report.counts["evaluated"] == 3 and report.counts["skipped (image missing from the folder)"] == 1
    # Reference: the API's embeddings, images squashed to the encoder's size as the published script does.
    dialogs = read_visdial(data)[:3]
    size = tiny_gill.image_processor.size
    imgs = [
        Image.open(images / f"VisualDialog_val2018_{d.image_id:012d}.jpg").convert("RGB").resize((size, size))
        for d in dialogs
    ]
    scores = fg.embed_texts(tiny_gill, [dialogue_text(d) for d in dialogs]).scores(fg.embed_images(tiny_gill, imgs))
    ranks = [rank_of(scores[i], i) for i in range(3)]
    assert report.metrics["t2i"]["R@1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / 3)
    by_image = [rank_of(scores.T[i], i) for i in range(3)]
    assert report.metrics["i2t (published script's axis)"]["R@1"] == pytest.approx(
        100 * sum(r == 1 for r in by_image) / 3
    )
    assert "FROMAGe paper" in report.table()


def published_losses(pipe, image, context: str, options) -> torch.Tensor:
    """The published rule (fromage evals/eval_visdial_generation.py), written out plainly, one option at a time:
    [image's visual tokens][context ids with special tokens][option ids with special tokens]; labels -100 on the
    image; per-position cross-entropy of each position's logits against that same position's label (no shift),
    summed over the option's positions."""
    m, tok = pipe.model, pipe.tokenizer
    visual = m.visual_tokens(m.encode_images(pipe.image_processor([image])))  # (1, n_visual, d)
    caption = torch.tensor([tok(context, add_special_tokens=True).input_ids])
    losses = []
    for option in options:
        answer = torch.tensor([tok(option, add_special_tokens=True).input_ids])
        x = torch.cat([visual, m.embed_tokens(caption), m.embed_tokens(answer)], dim=1)
        labels = torch.cat([torch.full(visual.shape[:2], -100), caption, answer], dim=1)
        logits = m.forward_lm(x).logits
        loss = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="none")
        losses.append(float(loss[visual.shape[1] + caption.shape[1] :].sum()))
    return torch.tensor(losses)


def test_visdial_rank_by_default_reproduces_the_published_scoring(make_pipeline, tmp_path):
    from tokenizers.processors import TemplateProcessing

    tiny_gill = make_pipeline("tiny-gill")
    tok = tiny_gill.tokenizer  # made to put BOS first with the special tokens, as OPT's tokenizer does
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", tok.bos_token_id)]
    )
    data, images, dense = write_visdial(tmp_path, n=2)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", dense=dense, batch_size=4, progress=False)
    report = evaluate("visdial-rank", tiny_gill, opts, model_name="tiny-gill")
    assert report.counts["rounds"] == 4 and report.counts["rounds with dense annotations"] == 2
    assert list(report.metrics) == ["published scoring"]  # a named row, not ""
    dialogs = read_visdial(data)
    rel = read_dense(dense)
    size = tiny_gill.image_processor.size
    # OPT's tokenizer puts BOS before each option: the published layout's "\nA: " + "</s>" + answer.
    assert tiny_gill.tokenizer("yes", add_special_tokens=True).input_ids[0] == tiny_gill.tokenizer.bos_token_id
    ranks, ndcgs, scored = [], [], []
    with torch.no_grad():
        for d in dialogs:
            img = Image.open(images / f"VisualDialog_val2018_{d.image_id:012d}.jpg").convert("RGB")
            img = img.resize((size, size))
            contexts = []
            for i, r in enumerate(d.rounds):  # the published script's own construction of the dialogue
                if i > 0:
                    contexts.append("A: " + d.rounds[i - 1].answer)
                contexts.append("Q: " + r.question + "?")
                context = "\n".join(contexts) + "\nA: "
                losses = published_losses(tiny_gill, img, context, r.options)
                order = torch.argsort(losses, stable=True)  # the lowest loss wins
                ranks.append(int((order == r.gt_index).nonzero()[0, 0]) + 1)
                scored.append(-losses)
                if rel[d.image_id][0] == i:
                    ndcgs.append(ndcg(-losses, torch.tensor(rel[d.image_id][1])))
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()[1:]]
    assert [x["rank"] for r in rows for x in r["rounds"]] == ranks
    got = torch.tensor([x["scores"] for r in rows for x in r["rounds"]])
    assert torch.allclose(got, torch.stack(scored), atol=1e-4)
    m = report.metrics["published scoring"]
    assert m["R@1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / 4)
    assert m["R@5"] == pytest.approx(100 * sum(r <= 5 for r in ranks) / 4)
    assert m["MRR"] == pytest.approx(100 * sum(1 / r for r in ranks) / 4, abs=1e-3)
    assert m["NDCG"] == pytest.approx(100 * sum(ndcgs) / 2, abs=1e-3)
    assert m["mean rank"] == pytest.approx(sum(ranks) / 4)


def test_visdial_rank_next_token_scoring_reads_the_answer_with_its_leading_space(tiny_gill, tmp_path):
    data, images, _ = write_visdial(tmp_path, n=1)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", scoring="next-token", progress=False)
    report = evaluate("visdial-rank", tiny_gill, opts, model_name="tiny-gill")
    d = read_visdial(data)[0]
    size = tiny_gill.image_processor.size
    img = Image.open(images / f"VisualDialog_val2018_{d.image_id:012d}.jpg").convert("RGB").resize((size, size))
    assert round_context(d, 1, "next-token").endswith("how many people?\nA:")
    ranks = []
    for i, r in enumerate(d.rounds):
        ctx = round_context(d, i, "next-token")
        ranks.append(
            rank_of(fg.score_candidates(tiny_gill, [img, ctx], [" " + o for o in r.options]).summed, r.gt_index)
        )
    assert report.metrics["next-token scoring"]["mean rank"] == pytest.approx(sum(ranks) / len(ranks))
    with pytest.raises(ValueError, match="--scoring must be"):
        EvalOptions(data=data, out=tmp_path, scoring="mean")


def test_the_documented_answer_layout_names_every_colour_on_the_toy_model(toy_gill):
    """docs/research.md's layout: the question ends in "\\nA:" and each answer brings its leading space, as the
    model read answers in training and in the chat. Without the space ("\\nA: " + "it is red.") the answer starts
    with a token the model never saw there, and half the colours go wrong."""
    from fromage_gill.toy import world as W

    colours = list(W.COLOURS)
    shown = [
        W.Scene((W.Thing("circle", c, "large"),), "white", position="center", variant=k) for k, c in enumerate(colours)
    ]

    def accuracy(question: str, answer: str) -> float:
        right = 0
        for k, scene in enumerate(shown):
            s = fg.score_candidates(toy_gill, [scene.render(), question], [answer.format(c) for c in colours])
            right += int(s.summed.argmax()) == k
        return right / len(colours)

    assert accuracy("Q: What colour is the shape?\nA:", " it is {}.") == 1.0
    assert accuracy("Q: What colour is the shape?\nA: ", "it is {}.") < 1.0


def test_a_malformed_annotation_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import fromage_gill.commands.eval as eval_command

    loads = []
    monkeypatch.setattr(eval_command, "load_from_args", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    data, images, _ = write_visdial(tmp_path, n=1)
    bad = json.loads(data.read_text())
    bad["data"]["dialogs"][0]["dialog"][0]["question"] = 99  # points past data.questions
    data.write_text(json.dumps(bad))
    argv = ["eval", "visdial-rank", "--model", "tiny-gill", "--data", str(data), "--images", str(images)]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "data.dialogs[0].dialog[0] points past data.questions" in capsys.readouterr().err
    assert loads == [] and not (tmp_path / "o").exists()


def test_cli_visdial_rank_without_dense_says_ndcg_was_not_computed(tmp_path, capsys):
    data, images, _ = write_visdial(tmp_path, n=1, rounds=1)
    argv = ["eval", "visdial-rank", "--model", "tiny-fromage", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    argv += ["--data", str(data), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NDCG not computed: pass the dense annotations with --dense" in out and "MRR" in out
    assert main([*argv, "--dense", str(tmp_path / "missing.json")]) == 2
    assert "--dense" in capsys.readouterr().err


def test_no_dialogue_image_in_the_folder_is_one_error_naming_the_file_pattern(tiny_gill, tmp_path):
    data, _, _ = write_visdial(tmp_path, n=1)
    (tmp_path / "other").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "unrelated.jpg")
    opts = EvalOptions(data=data, images=tmp_path / "other", out=tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"VisualDialog_val2018_000000185000\.jpg"):
        evaluate("visdial-t2i", tiny_gill, opts, model_name="tiny-gill")


class _TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 9, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean((2, 3)).double()


def test_visdial_generation_runs_every_metric_with_offline_networks(tiny_gill, tmp_path, monkeypatch):
    from fromage_gill.config import load_config
    from fromage_gill.generate.diffusion import ImageGenerator
    from fromage_gill.magic import load_clip

    calls = []
    original = ImageGenerator.__call__

    def recording(self, prompt_embeds, **kwargs):
        calls.append(prompt_embeds.shape[0])
        return original(self, prompt_embeds, **kwargs)

    monkeypatch.setattr(ImageGenerator, "__call__", recording)

    data, images, _ = write_visdial(tmp_path, n=3)
    judge = load_clip(load_config("tiny-magic").clip, device="cpu", dtype=torch.float32)
    opts = EvalOptions(
        data=data, images=images, out=tmp_path / "g", num_inference_steps=1, batch_size=2, progress=False
    )
    report = evaluate(
        "visdial-generation",
        tiny_gill,
        opts,
        model_name="tiny-gill",
        judge=judge,
        lpips_backbone="random",
        fid_feature=_TinyFeatures(),
    )
    assert len(report.notes) == 1 and report.notes[0].startswith("2 prompts per diffusion call")
    assert calls == [2, 2, 1, 1]  # --batch-size 2 over 3 dialogues: GILL's and SD's batch, then the last one
    for system in ("GILL", "Stable Diffusion alone"):
        assert set(report.metrics[system]) == {"CLIP sim", "LPIPS", "FID"}
        assert -1 <= report.metrics[system]["CLIP sim"] <= 1 and report.metrics[system]["LPIPS"] > 0
    # GILL and SD alone read different conditioning: their pictures differ.
    a = np.asarray(Image.open(tmp_path / "g" / "images" / "gill" / "185000.png"))
    b = np.asarray(Image.open(tmp_path / "g" / "images" / "sd" / "185000.png"))
    assert not np.array_equal(a, b)
