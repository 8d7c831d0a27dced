"""The evaluation metrics against values worked out by hand: R@k / MRR / VisDial NDCG of a known ranking, BLEU of a
hand-worked pair, FID of identical sets ~0 and LPIPS of identical images 0; the networks' offline errors name
the file to put where."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill.evaluate import caption_metrics
from fromage_gill.evaluate.caption_metrics import score_captions, simple_tokenize, spice_missing
from fromage_gill.evaluate.image_metrics import (
    FID_WEIGHTS,
    MetricUnavailable,
    clip_similarities,
    fid,
    fid_metric,
    lpips_distances,
    lpips_metric,
)
from fromage_gill.evaluate.metrics import mean_reciprocal_rank, ndcg, rank_of, recall_at
from fromage_gill.evaluate.report import EvalReport, Results

FAST = ("B@1", "B@2", "B@3", "B@4", "ROUGE-L", "CIDEr", "SPICE")


def _photos(n: int, seed: int = 0) -> list[Image.Image]:
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (40 + 4 * i, 52, 3), dtype=np.uint8), "RGB") for i in range(n)]


def test_rank_recall_and_mrr_of_a_known_ranking():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    assert [rank_of(scores, t) for t in range(5)] == [1, 5, 3, 4, 2]
    assert rank_of(torch.tensor([1.0, 1.0, 1.0]), 2) == 3  # a tie never favours the ground truth
    ranks = [1, 3, 7, 12]
    assert recall_at(ranks) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 12) / 4)
    with pytest.raises(ValueError, match="not one of the 5 candidates"):
        rank_of(scores, 5)


def test_visdial_ndcg_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])  # model order: 0, 4, 2, 3, 1
    relevance = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0])  # 3 relevant options: K = 3
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 0.5 / math.log2(4)  # options 0, 4, 2
    ideal = 1 / math.log2(2) + 1 / math.log2(3) + 0.5 / math.log2(4)
    assert ndcg(scores, relevance) == pytest.approx(dcg / ideal)
    assert ndcg(relevance, relevance) == pytest.approx(1.0)
    assert math.isnan(ndcg(scores, torch.zeros(5)))


def test_bleu_rouge_cider_by_hand_and_which_metrics_ran():
    # "a b c d" against "a b c d e": every n-gram precision is 1, the brevity penalty exp(1 - 5/4).
    got = score_captions({"1": "a b c d"}, {"1": ["a b c d e"]}, metrics=FAST)
    bp = 100 * math.exp(1 - 5 / 4)
    for n in range(1, 5):
        assert got.scores[f"B@{n}"] == pytest.approx(bp, rel=1e-6)
    # ROUGE-L (beta 1.2): LCS 4, precision 1, recall 4/5.
    p, r, beta = 1.0, 0.8, 1.2
    assert got.scores["ROUGE-L"] == pytest.approx(100 * (1 + beta**2) * p * r / (r + beta**2 * p), rel=1e-6)
    assert {"B@1", "B@4", "ROUGE-L", "CIDEr"} <= set(got.ran)
    why = spice_missing()
    if why is None:
        assert "SPICE" in got.ran or "SPICE" in got.not_run
    else:
        assert got.not_run["SPICE"] == why and ("Java" in why or "stanford-corenlp-3.6.0" in why)
    if caption_metrics.java_available():  # METEOR (slow: Java loads its paraphrase table) runs in the captioning test
        assert got.tokenizer == "ptb" and "METEOR" not in got.ran + list(got.not_run)
    with pytest.raises(ValueError, match="same images"):
        score_captions({"1": "a"}, {"2": ["a"]})


def test_without_java_the_java_metrics_say_why_and_the_rest_still_run(monkeypatch):
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)
    got = score_captions({"1": "A dog, running!", "2": "a cat"}, {"1": ["a dog running"], "2": ["a cat sits"]})
    assert got.tokenizer == "simple" and simple_tokenize("A dog, running!") == "a dog running"
    assert got.not_run["METEOR"].startswith("needs Java") and "default-jre-headless" in got.not_run["METEOR"]
    assert "Java" in got.not_run["SPICE"]
    # every word is in its reference (precision 5/5); the brevity penalty is exp(1 - 6/5): 5 words against 6
    assert got.scores["B@1"] == pytest.approx(100 * math.exp(1 - 6 / 5), rel=1e-6)
    assert set(got.per_image) == {"1", "2"}


def test_lpips_of_identical_images_is_zero_and_of_different_ones_is_not():
    metric = lpips_metric("random")  # built offline: random AlexNet, the shipped LPIPS layers
    a, b = _photos(3), _photos(3, seed=1)
    assert lpips_distances(metric, a, a) == [0.0, 0.0, 0.0]
    assert all(d > 0 for d in lpips_distances(metric, a, b))


class _TinyFeatures(torch.nn.Module):
    """An offline FID feature extractor: uint8 images -> 6 pooled conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 7, stride=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).relu().mean((2, 3)).double()


def test_fid_of_identical_sets_is_zero_and_grows_with_a_shift():
    metric = fid_metric(_TinyFeatures())
    real = _photos(8)
    assert abs(fid(metric, real, real)) < 1e-6
    darker = [Image.fromarray((np.asarray(im) * 0.5).astype(np.uint8)) for im in real]
    assert fid(metric, real, darker) > 1e-3
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(metric, real[:1], real[:1])


def test_offline_networks_name_the_file_and_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache, whatever this machine holds
    with pytest.raises(MetricUnavailable, match=rf"{FID_WEIGHTS}.*{tmp_path / 'torch' / 'hub' / 'checkpoints'}"):
        fid_metric(2048)
    with pytest.raises(MetricUnavailable, match=r"alexnet-owt-7be5be79\.pth.*put the file in"):
        lpips_metric("alex")
    with pytest.raises(ValueError, match="LPIPS backbone must be one of"):
        lpips_metric("resnet")


def test_clip_similarity_of_an_image_with_itself_is_one():
    from fromage_gill.config import load_config
    from fromage_gill.magic import load_clip

    clip = load_clip(load_config("tiny-magic").clip, device="cpu", dtype=torch.float32)
    a, b = _photos(2), _photos(2, seed=3)
    np.testing.assert_allclose(clip_similarities(clip, a, a), [1.0, 1.0], atol=1e-5)
    assert all(s < 1 - 1e-4 for s in clip_similarities(clip, a, b))


def test_results_resume_drops_a_half_written_line_and_refuses_another_run(tmp_path):
    res = Results(tmp_path, "t", {"model": "m"})
    res.add({"id": 1, "x": 1})
    res.add({"id": "2", "x": 2})
    with res.path.open("a") as f:
        f.write('{"id": "3", "x"')  # killed mid-write
    again = Results(tmp_path, "t", {"model": "m"})
    assert sorted(r["id"] for r in again) == ["1", "2"] and 1 in again and "3" not in again
    with pytest.raises(ValueError, match="another run.*another --out"):
        Results(tmp_path, "t", {"model": "other"})


def test_the_table_prints_the_run_beside_the_papers_rows():
    report = EvalReport("visdial-t2i", "tiny", {"t2i": {"R@1": 12.5, "R@5": 50.0, "R@10": 100.0}}, {"evaluated": 8})
    table = report.table()
    assert "this run: t2i" in table and "12.50" in table
    assert "FROMAGe paper" in table and "20.80" in table and "56.00" in table and "CLIP ViT-L/14" in table
    assert report.to_dict()["paper_figures"]["FROMAGe paper"] == {"R@1": 20.8, "R@5": 44.9, "R@10": 56.0}
