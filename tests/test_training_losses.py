"""The training losses and sequence layouts against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fromage_gill.layout import (
    IGNORE_INDEX,
    Context,
    Visual,
    caption_rows,
    layout,
    mask_labels,
    retrieval_rows,
    splice_visual,
)
from fromage_gill.training.losses import (
    LossWeights,
    contrastive_loss,
    decision_loss,
    l2_loss,
    next_token_loss,
    recall_at_k,
    token_accuracy,
)

X = IGNORE_INDEX


def test_contrastive_loss_hand_values():
    eye = torch.eye(2)
    zero = torch.tensor(0.0)  # log temperature 0: logits are the plain dot products
    # logits [[1, 0], [0, 1]]: every row and column is -log(e / (e + 1)) = log(1 + e^-1)
    assert contrastive_loss(eye, eye, zero).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # image rows both [1, 0]: logits [[1, 1], [0, 0]]. Text->image: log 2 twice. Image->text (transpose
    # [[1, 0], [1, 0]]): log(1 + e^-1) and log(1 + e).
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t2i = math.log(2)
    i2t = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert contrastive_loss(eye, img, zero).item() == pytest.approx((t2i + i2t) / 2, abs=1e-6)
    # the temperature scales the logits: scale e^log(2) = 2 -> logits [[2, 0], [0, 2]]
    assert contrastive_loss(eye, eye, torch.tensor(math.log(2))).item() == pytest.approx(
        math.log(1 + math.exp(-2)), abs=1e-6
    )


def test_contrastive_loss_is_symmetric_in_its_two_directions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    s = torch.tensor(0.3)
    assert contrastive_loss(a, b, s).item() == pytest.approx(contrastive_loss(b, a, s).item(), abs=1e-6)


def test_l2_loss_is_mean_per_token_euclidean_distance():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # distances 5 and 1
    assert l2_loss(pred, target).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="num_queries"):
        l2_loss(torch.zeros(1, 3, 2), target)


def test_next_token_loss_and_accuracy_skip_masked_targets():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]]])  # the last position predicts nothing
    labels = torch.tensor([[X, 1, 0]])
    # position 0 predicts 1 from [0, 0]: log 2; position 1 predicts 0 from [2, 0]: log(1 + e^-2)
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert next_token_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert token_accuracy(logits, labels) == (1, 2)
    all_masked = next_token_loss(logits.requires_grad_(), torch.full((1, 3), X))
    assert all_masked.item() == 0.0 and all_masked.requires_grad


def test_decision_loss():
    logits = torch.tensor([[0.0, math.log(3)]])  # p(retrieve) = 3/4
    assert decision_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_mask_labels_drops_padding_specials_and_visual_slots():
    ids = torch.tensor([[5, 1, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    keep = torch.tensor([[True, False, False, False]])
    assert mask_labels(ids, mask, frozenset({1}), keep=keep).tolist() == [[X, X, 7, X]]


def test_layout_places_visual_slots_and_masks_them():
    lay = layout([[Visual(0), 9, 3], [7]], n_visual=2, pad_id=0, ignore_ids=frozenset({9}))
    assert lay.input_ids.tolist() == [[0, 0, 9, 3], [7, 0, 0, 0]]
    assert lay.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert lay.visual_slot.tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1]]
    assert lay.labels.tolist() == [[X, X, X, 3], [7, X, X, X]]
    lay = layout([[Visual(1)]], n_visual=3, pad_id=0, ignore_ids=frozenset())
    assert lay.visual_slot.tolist() == [[3, 4, 5]]  # image 1's three rows of the flattened (N * n, d) embeddings


def test_caption_rows_concatenate_the_next_example():
    caps = [[1, 2], [3]]
    assert caption_rows(caps, bos_id=9, concat=False) == [[Visual(0), 9, 1, 2], [Visual(1), 9, 3]]
    assert caption_rows(caps, bos_id=9, concat=True) == [
        [Visual(0), 9, 1, 2, Visual(1), 9, 3],
        [Visual(1), 9, 3, Visual(0), 9, 1, 2],
    ]
    assert caption_rows(caps, bos_id=None, concat=False) == [[Visual(0), 1, 2], [Visual(1), 3]]


def test_a_history_is_read_first_as_a_chat_lays_out_a_later_turn():
    caps, prompts, histories = [[1, 2], [3]], [[4], []], [[7, 8], []]
    rows = caption_rows(caps, bos_id=9, concat=False, prompts=prompts, histories=histories)
    assert rows == [[9, Context((7, 8)), Visual(0), Context((4,)), 1, 2], [Visual(1), 9, 3]]
    lay = layout(rows, n_visual=2, pad_id=0, ignore_ids=frozenset({9, 0}))
    assert lay.visual_slot.tolist()[0] == [-1, -1, -1, 0, 1, -1, -1, -1]  # the image after BOS and its history
    assert lay.labels.tolist()[0] == [X, X, X, X, X, X, 1, 2]  # history, image and prompt read, not predicted
    rows, first = retrieval_rows([[1, 2], [3]], bos_id=9, image_token_ids=[50, 51], histories=histories)
    assert rows == [[9, Context((7, 8)), 1, 2, 50, 51], [9, 3, 50, 51]] and first == [5, 2]
    lay = layout(rows, n_visual=1, pad_id=0, ignore_ids=frozenset({9, 0}))
    assert lay.labels.tolist() == [[X, X, X, 1, 2, 50, 51], [X, 3, 50, 51, X, X, X]]


def test_retrieval_rows_append_every_image_token():
    rows, first = retrieval_rows([[1, 2], [3]], bos_id=9, image_token_ids=[50, 51])
    assert rows == [[9, 1, 2, 50, 51], [9, 3, 50, 51]]
    assert first == [3, 2]
    lay = layout(rows, n_visual=1, pad_id=0, ignore_ids=frozenset({9, 0}))
    assert lay.labels.tolist() == [[X, 1, 2, 50, 51], [X, 3, 50, 51, X]]  # the image tokens are targets


def test_visual_slots_take_visual_rows_and_the_rest_token_rows(tiny_fromage):
    m = tiny_fromage.model
    lay = layout([[Visual(1), 5, 6], [Visual(0), 7]], n_visual=1, pad_id=0, ignore_ids=frozenset())
    visual = torch.randn(2, 1, m.hidden_size)
    emb = splice_visual(m.embed_tokens(lay.input_ids), visual, lay.visual_slot)
    torch.testing.assert_close(emb[0, 0], visual[1, 0])
    torch.testing.assert_close(emb[1, 0], visual[0, 0])
    torch.testing.assert_close(emb[0, 1:], m.embed_tokens(torch.tensor([5, 6])))
    torch.testing.assert_close(emb[1, 1], m.embed_tokens(torch.tensor([7]))[0])


def test_recall_at_k_counts_ties_against_the_match():
    scores = torch.tensor([[1.0, 0.5], [0.9, 0.2]])
    assert recall_at_k(scores, (1, 2)) == {1: 0.5, 2: 1.0}
    assert recall_at_k(torch.ones(2, 2), (1,)) == {1: 0.0}


def test_loss_weights_reject_negative():
    with pytest.raises(ValueError, match="contrastive"):
        LossWeights(contrastive=-1)
