"""``fromage-gill eval vist-retrieval`` / ``vist-generation`` on a tiny VIST story-in-sequence file written here in
the distributed format: the ranks equal the published script's construction, a story with a missing image is
skipped and counted, a rerun resumes, and bad inputs get one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill.cli import main
from fromage_gill.evaluate import EvalOptions, evaluate
from fromage_gill.evaluate import vist_retrieval as vr
from fromage_gill.evaluate.readers import DataError

CAPTIONS = ["we went to the park", "the dog ran far", "then it rained", "we ate lunch", "home at last"]


def write_vist(root, n_stories: int = 4, missing: str | None = None):
    """``root/sis.json`` (SIS format: one-element annotation lists, photo order shuffled in the file) and
    ``root/images/<photo_flickr_id>.png``."""
    g = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    anns, images = [], []
    for s in range(n_stories):
        for k in reversed(range(5)):  # the file's order is not the story's order
            pid = str(1000 + 10 * s + k)
            anns.append(
                [
                    {
                        "story_id": str(50 + s),
                        "album_id": "9",
                        "photo_flickr_id": pid,
                        "worker_arranged_photo_order": k,
                        "text": f"{CAPTIONS[k]} {s}",
                        "original_text": f"{CAPTIONS[k].capitalize()} {s}.",
                        "storylet_id": str(5 * s + k),
                        "tier": "story",
                    }
                ]
            )
            images.append({"id": pid, "url_o": f"https://example.invalid/{pid}.jpg"})
            if pid != missing:
                arr = g.integers(0, 256, (36 + 2 * k, 48, 3), dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(root / "images" / f"{pid}.png")
    (root / "sis.json").write_text(json.dumps({"images": images, "annotations": anns, "info": {}, "albums": []}))
    return root / "sis.json", root / "images"


def reference_rank(pipe, story: int, images_dir, n_stories: int) -> int:
    """The published script's construction: [BOS c1][img1][BOS c2]...[BOS c5 RET] embedded piece by piece, the
    [RET] state through text_fc, cosine against every story image's visual_fc embedding, context images out."""
    m, tok = pipe.model, pipe.tokenizer
    ids = [str(1000 + 10 * s + k) for s in range(n_stories) for k in range(5)]
    ids.sort()
    with torch.no_grad():
        imgs = [Image.open(images_dir / f"{i}.png").convert("RGB") for i in ids]
        cand = m.image_embedding(m.encode_images(m.vision.processor(imgs)))
        pieces = []
        for k in range(5):
            text = [tok.bos_token_id, *tok(f"{CAPTIONS[k]} {story}", add_special_tokens=False).input_ids]
            if k == 4:
                text += m.image_token_ids
            pieces.append(m.embed_tokens(torch.tensor([text]))[0])
            if k < 4:
                img = Image.open(images_dir / f"{1000 + 10 * story + k}.png").convert("RGB")
                pieces.append(m.visual_tokens(m.encode_images(m.vision.processor([img])))[0])
        hidden = m.forward_lm(torch.cat(pieces)[None], logits="none").hidden[0, -len(m.image_token_ids)]
        scores = m.text_embedding(hidden[None])[0] @ cand.T
    for k in range(4):
        scores[ids.index(str(1000 + 10 * story + k))] = -torch.inf
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return order.index(ids.index(str(1000 + 10 * story + 4))) + 1


def test_vist_retrieval_ranks_as_the_published_script_and_resumes(tiny_fromage, tmp_path, monkeypatch):
    data, images = write_vist(tmp_path, missing="1031")  # story 53 lacks an image: skipped and counted
    opts = EvalOptions(data=data, images=images, out=tmp_path / "out", batch_size=2, progress=False)
    report = evaluate("vist-retrieval", tiny_fromage, opts, model_name="tiny-fromage")
    assert report.counts["evaluated"] == 3 and report.counts["skipped (an image missing from the folder)"] == 1
    assert report.counts["candidate images"] == 15
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines()[1:])}
    assert sorted(records) == ["50", "51", "52"]
    # "5 captions + 4 images": the ranks are the published construction's (3 stories, 15 candidates)
    ranks = [records[str(50 + s)]["settings"]["5 captions + 4 images"]["rank"] for s in range(3)]
    want = [reference_rank(tiny_fromage, s, images, 3) for s in range(3)]
    assert ranks == want
    for r in records.values():
        for s in ("1 caption", "5 captions", "5 captions + 4 images"):
            top = r["settings"][s]["top"]
            assert len(top) == 10 and not {str(int(r["gt"]) - k) for k in range(1, 5)} & set(top[:11])  # context out
    expected = {"R@1": 100 * sum(x <= 1 for x in want) / 3, "R@5": 100 * sum(x <= 5 for x in want) / 3}
    assert {k: report.metrics["5 captions + 4 images"][k] for k in expected} == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == report.metrics and "FROMAGe paper: 5 captions + 4 images" in saved["paper_figures"]

    # A rerun does no model work and gives the same figures.
    monkeypatch.setattr(vr, "embed_prompts", lambda *a, **k: pytest.fail("resumed run re-embedded a story"))
    monkeypatch.setattr("fromage_gill.evaluate.common.embed_images", lambda *a, **k: pytest.fail("re-embedded images"))
    again = evaluate("vist-retrieval", tiny_fromage, opts, model_name="tiny-fromage")
    assert again.metrics == report.metrics


def test_cli_vist_retrieval_prints_the_table_and_bad_inputs_get_one_clear_error(tmp_path, capsys):
    data, images = write_vist(tmp_path, n_stories=2)
    base = ["eval", "vist-retrieval", "--model", "tiny-gill", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    assert main([*base, "--data", str(data), "--images", str(images), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "this run: 5 captions + 4 images" in out and "GILL paper: 5 captions + 4 images" in out and "20.30" in out
    assert main([*base, "--data", str(tmp_path / "nope.json"), "--images", str(images)]) == 2
    assert "--data" in capsys.readouterr().err
    (tmp_path / "wrong.json").write_text(json.dumps({"data": {"dialogs": []}}))
    assert (
        main([*base, "--data", str(tmp_path / "wrong.json"), "--images", str(images), "--out", str(tmp_path / "w")])
        == 2
    )
    assert "has no 'annotations'; expected VIST's story-in-sequence format" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--data", str(data), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_no_story_with_all_its_images_is_one_error_naming_the_file_pattern(tiny_fromage, tmp_path):
    data, images = write_vist(tmp_path, n_stories=1, missing="1000")
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"none of the 1 stories.*photo_flickr_id 1000.*<photo_flickr_id>\.jpg"):
        evaluate("vist-retrieval", tiny_fromage, opts, model_name="tiny-fromage")
    with pytest.raises(ValueError, match="--images DIR"):
        evaluate("vist-retrieval", tiny_fromage, EvalOptions(data=data, out=tmp_path / "o"), model_name="x")


def test_vist_generation_against_stable_diffusion_alone(tiny_gill, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no downloaded networks, whatever this machine has
    from fromage_gill.config import load_config
    from fromage_gill.magic import load_clip

    data, images = write_vist(tmp_path, n_stories=3)
    judge = load_clip(load_config("tiny-magic").clip, device="cpu", dtype=torch.float32)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "g", num_inference_steps=2, progress=False)
    report = evaluate("vist-generation", tiny_gill, opts, model_name="tiny-gill", judge=judge, lpips_backbone="alex")
    assert set(report.metrics) == {"GILL", "Stable Diffusion alone"} and report.counts["evaluated"] == 3
    for system in ("gill", "sd"):
        assert sorted(p.name for p in (tmp_path / "g" / "images" / system).iterdir()) == ["50.png", "51.png", "52.png"]
    # Each CLIP similarity is the judge's cosine between the saved image and the story's last image.
    rec = json.loads((tmp_path / "g" / "results.jsonl").read_text().splitlines()[1])
    gen = Image.open(tmp_path / "g" / "images" / "gill" / f"{rec['id']}.png").convert("RGB")
    truth = Image.open(images / f"{1000 + 10 * (int(rec['id']) - 50) + 4}.png").convert("RGB")
    want = float((judge.embed_images([gen]) * judge.embed_images([truth])).sum())
    assert rec["gill"]["CLIP sim"] == pytest.approx(want, abs=1e-5)
    # LPIPS and FID need downloaded networks: offline they are reported as not run, naming the file.
    notes = " ".join(report.notes)
    assert "LPIPS not run" in notes and "alexnet-owt-7be5be79.pth" in notes
    assert "FID not run" in notes and "weights-inception-2015-12-05-6726825d.pth" in notes


def test_generation_needs_a_model_that_generates(tiny_fromage, tmp_path):
    data, images = write_vist(tmp_path, n_stories=1)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="cannot generate them"):
        evaluate("vist-generation", tiny_fromage, opts, model_name="tiny-fromage")
