"""The pure decoding functions: samplers and the image-token logit rules (published quirks included)."""

from __future__ import annotations

import math

import pytest
import torch

from fromage_gill.generate.sampling import image_token_logits, sample, top_k_filter, top_p_filter

INF = math.inf


def test_greedy_is_argmax_and_ignores_top_p_top_k():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.0]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]
    assert sample(logits, temperature=0.0, top_p=0.1, top_k=1).tolist() == [1, 0]


def test_top_k_keeps_k_best():
    x = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_filter(x, 2).tolist() == [[-INF, 4.0, 3.0, -INF]]
    assert top_k_filter(x, 0).tolist() == x.tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    kept = top_p_filter(x, 0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert top_p_filter(x, 0.45).isfinite()[0].tolist() == [True, False, False, False]
    assert top_p_filter(x, 0.01).isfinite()[0].tolist() == [True, False, False, False]  # the best always stays
    # works on unsorted rows too
    shuffled = x[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.7).isfinite()[0].tolist() == [False, True, False, True]


def test_seed_reproduces_samples_and_distribution_follows_temperature():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    a = [sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample(logits[:1], temperature=1.0, generator=g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=50).float() / len(draws)
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.03
    g = torch.Generator().manual_seed(1)
    cold = {int(sample(logits[:1], temperature=0.01, generator=g)) for _ in range(50)}
    assert cold == {int(logits[0].argmax())}


def test_sample_with_top_k_only_draws_from_the_k_best():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(3))
    best = set(torch.topk(logits[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, temperature=2.0, top_k=3, generator=g)) for _ in range(200)} <= best


def test_positive_infinity_forces_the_token():
    logits = torch.tensor([[0.0, 1.0, INF, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, temperature=1.0, generator=g)) for _ in range(20)} == {2}


IMG = [4, 5, 6]


def rows(v):
    return torch.tensor([[1.0, 2.0, 0.5, 0.0, v, 9.0, 9.0]])


def test_other_image_tokens_are_never_sampled():
    out = image_token_logits(rows(1.0), IMG)
    assert out[0, 5] == -INF and out[0, 6] == -INF and out[0, 4] == 1.0
    assert out[0, :4].tolist() == [1.0, 2.0, 0.5, 0.0]


def test_fromage_scaling_quirk_multiplies_the_raw_logit():
    # A positive [RET] logit grows with the factor, a negative one shrinks: factor 2 makes -1.5 -> -3.
    assert image_token_logits(rows(1.5), IMG, style="fromage", ret_scale_factor=2.0)[0, 4] == 3.0
    assert image_token_logits(rows(-1.5), IMG, style="fromage", ret_scale_factor=2.0)[0, 4] == -3.0
    assert image_token_logits(rows(-1.5), IMG, style="fromage", ret_scale_factor=0.0)[0, 4] == 0.0


def test_gill_scaling_takes_the_absolute_value_above_one_only():
    assert image_token_logits(rows(-1.5), IMG, style="gill", ret_scale_factor=2.0)[0, 4] == 3.0
    assert image_token_logits(rows(-1.5), IMG, style="gill", ret_scale_factor=2.0, gen_scale_factor=2.0)[0, 4] == 6.0
    assert image_token_logits(rows(-1.5), IMG, style="gill", ret_scale_factor=0.5)[0, 4] == -1.5


def test_bias_is_additive_and_allow_mask_forbids():
    assert image_token_logits(rows(-1.5), IMG, bias=2.0)[0, 4] == 0.5
    both = torch.cat([rows(1.0), rows(1.0)])
    out = image_token_logits(both, IMG, allow_image=torch.tensor([True, False]), bias=INF)
    assert out[0, 4] == INF and out[1, 4] == -INF
    assert image_token_logits(rows(1.0), IMG, allow_image=False)[0, 4] == -INF


def test_rules_do_not_modify_their_input():
    x = rows(1.0)
    image_token_logits(x, IMG, bias=3.0)
    assert x.tolist() == rows(1.0).tolist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        sample(rows(0.0), temperature=-1.0)
    with pytest.raises(ValueError, match="style"):
        image_token_logits(rows(0.0), IMG, style="opt")
