"""``fromage-gill eval captioning`` (MAGIC) on tiny Karpathy-split and COCO-captions files written here: the captions
are MagicModel.generate's, the scores pycocoevalcap's, and the table shows the MAGIC paper's MSCOCO and Flickr30k
rows; what could not run (SPICE's CoreNLP jars offline, or Java) is said."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fromage_gill.cli import main
from fromage_gill.evaluate import EvalOptions, caption_metrics, evaluate
from fromage_gill.evaluate.caption_metrics import score_captions
from fromage_gill.evaluate.readers import DataError, read_captions

REFS = [["a dog on the grass", "a brown dog runs"], ["two cats on a sofa", "cats sleeping"], ["a red car", "a car"]]


@pytest.fixture(scope="module")
def tiny_magic():
    from fromage_gill.magic import load_magic

    return load_magic("tiny-magic", device="cpu", dtype="fp32")


def write_karpathy(root, splits=("test", "test", "train")):
    g = np.random.default_rng(2)
    (root / "val2014").mkdir(parents=True)
    images = []
    for i, split in enumerate(splits):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(g.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(root / "val2014" / name)
        sentences = [{"raw": r, "tokens": r.split(), "imgid": i} for r in REFS[i]]
        images.append(
            {"filepath": "val2014", "filename": name, "split": split, "cocoid": 100 + i, "sentences": sentences}
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root / "dataset_coco.json", root


def test_captioning_scores_magics_captions_with_pycocoevalcap_and_prints_both_paper_rows(tiny_magic, tmp_path):
    data, images = write_karpathy(tmp_path)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", progress=False)
    report = evaluate("captioning", tiny_magic, opts, model_name="tiny-magic")
    assert report.counts == {"images": 2, "captioned": 2}  # the test split only
    records = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()[1:]]
    for r in records:
        img = Image.open(images / r["file"]).convert("RGB")
        assert r["caption"] == tiny_magic.generate([img]).text
    fast = ("B@1", "B@2", "B@3", "B@4", "ROUGE-L", "CIDEr")  # METEOR's Java start is slow: once is enough
    want = score_captions(
        {r["id"]: r["caption"] for r in records}, {r["id"]: r["references"] for r in records}, metrics=fast
    )
    assert {k: report.metrics["test split"][k] for k in fast} == pytest.approx(want.scores)
    if caption_metrics.java_available():
        assert 0 <= report.metrics["test split"]["METEOR"] <= 100
    else:
        assert any(n.startswith("METEOR not run: needs Java") for n in report.notes)
    table = report.table()
    assert "MAGIC paper: MSCOCO" in table and "56.80" in table and "49.30" in table and "11.30" in table
    assert "MAGIC paper: Flickr30k" in table
    assert any(n.startswith("SPICE not run") for n in report.notes) or "SPICE" in report.metrics["test split"]
    coco = json.loads((tmp_path / "o" / "captions.json").read_text())
    assert {c["image_id"] for c in coco} == {"100", "101"}


def test_coco_captions_json_is_read_too(tmp_path):
    (tmp_path / "captions_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
                "annotations": [{"image_id": 7, "id": 1, "caption": "x"}, {"image_id": 7, "id": 2, "caption": "y"}],
            }
        )
    )
    got = read_captions(tmp_path / "captions_val2014.json")
    assert [(c.image_id, c.file, c.references) for c in got] == [("7", "a.jpg", ("x", "y"))]


def test_captioning_errors_name_the_problem(tiny_magic, tmp_path, capsys):
    data, images = write_karpathy(tmp_path)
    with pytest.raises(DataError, match=r"no images in split 'val' \(it has test, train\); use --split"):
        read_captions(data, "val")
    (images / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"1 of the 2 images .* are not in .*COCO_val2014_000000000001\.jpg"):
        evaluate("captioning", tiny_magic, opts, model_name="tiny-magic")
    argv = ["eval", "captioning", "--model", "tiny-gill", "--data", str(data), "--images", str(images)]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2  # the data is checked first, before any model loads
    assert "1 of the 2 images" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(images / "val2014" / "COCO_val2014_000000000001.jpg")
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "captioning runs MAGIC: --model must be a MAGIC config" in err and "got 'tiny-gill', a gill model" in err


def test_captioning_resumes_and_a_metric_subset_runs_only_those(tiny_magic, tmp_path, monkeypatch):
    data, images = write_karpathy(tmp_path)
    opts = EvalOptions(data=data, images=images, out=tmp_path / "o", progress=False, caption_metrics=("B@1", "CIDEr"))
    first = evaluate("captioning", tiny_magic, opts, model_name="tiny-magic")
    assert set(first.metrics["test split"]) == {"B@1", "CIDEr"}
    from fromage_gill.magic import MagicModel

    monkeypatch.setattr(MagicModel, "generate", lambda *a, **k: pytest.fail("a resumed run captioned again"))
    assert evaluate("captioning", tiny_magic, opts, model_name="tiny-magic").metrics == first.metrics
    with pytest.raises(ValueError, match="--metrics: \\['BLEU'\\]; choose from"):
        EvalOptions(data=data, out=tmp_path, caption_metrics=("BLEU",))


def test_cli_captioning(tmp_path, capsys):
    data, images = write_karpathy(tmp_path, splits=("test",))
    argv = ["eval", "captioning", "--model", "tiny-magic", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    argv += ["--data", str(data), "--images", str(images), "--out", str(tmp_path / "o"), "--metrics", "B@4,ROUGE-L"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "this run" in out and "MAGIC paper: MSCOCO" in out and "ROUGE-L" in out
    assert set(json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["test split"]) == {"B@4", "ROUGE-L"}
