"""Prompt encoding: BOS placement, the dialogue template, position keys, partial embedding, the vision cache."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fromage_gill.config import DialogueSpec
from fromage_gill.generate.prompt import (
    ImageSegment,
    Prompt,
    TokenIds,
    Turn,
    VisionCache,
    dialogue_pieces,
    encode_pieces,
    normalize_message,
)
from fromage_gill.images import ImageError


def ids(tok, text):
    return tuple(tok(text, add_special_tokens=False).input_ids)


def test_bos_once_before_the_first_text_and_strings_joined(tiny_fromage, images):
    tok = tiny_fromage.tokenizer
    img = ImageSegment(images[0])
    p = encode_pieces(tok, [img, "a cat", " sits", img, "there"], n_visual=1)
    assert p.parts[0] is img
    assert p.parts[1] == (tok.bos_token_id, *ids(tok, "a cat sits"))
    assert p.parts[3] == ids(tok, "there")  # no second BOS
    assert len(p) == 1 + len(p.parts[1]) + 1 + len(p.parts[3])
    assert encode_pieces(tok, ["a cat"], 1, bos=False).parts == [ids(tok, "a cat")]


def test_dialogue_template_reproduces_the_published_layout(tiny_fromage, images):
    d = DialogueSpec()
    img = ImageSegment(images[0])
    turns = [
        Turn("user", [img, "what is it?"]),
        Turn("assistant", [" a cat"], tokens=(5, 6)),
        Turn("user", ["and", img, "this?"]),
    ]
    pieces = dialogue_pieces(turns, d, [100])
    # An image sent before any text goes ahead of "Q: ", as the published demo placed uploads.
    assert pieces == [img, "Q: ", "what is it?", "\nA:", TokenIds((5, 6)), "\n", "Q: ", "and", img, "this?", "\nA:"]
    p = encode_pieces(tiny_fromage.tokenizer, pieces, 1)
    text = tiny_fromage.tokenizer.decode(
        [t for part in p.parts if not isinstance(part, ImageSegment) for t in part if t < 100 or t > 6]
    )
    assert "Q: what is it?\nA:" in text and "Q: and" in text


def test_assistant_turn_without_tokens_uses_text_and_image_tokens(images):
    turns = [Turn("user", ["hi"]), Turn("assistant", ["look", ImageSegment(images[1], "retrieved"), "there"])]
    pieces = dialogue_pieces(turns, DialogueSpec(), [7, 8])
    assert pieces[-3:] == ["look", TokenIds((7, 8)), "there"]


def test_answer_images_omit_leaves_an_answers_image_tokens_out_of_the_history(images):
    """answer_images="omit": an earlier answer reads as its words only, whether replayed from its tokens or built
    from its segments; the user's images stay."""
    omit = DialogueSpec(answer_images="omit")
    img = ImageSegment(images[0])
    turns = [
        Turn("user", [img, "show me"]),
        Turn("assistant", [" here", ImageSegment(images[1], "retrieved")], tokens=(5, 7, 8, 6)),
        Turn("user", ["again"]),
    ]
    assert dialogue_pieces(turns, omit, [7, 8]) == [
        img,
        "Q: ",
        "show me",
        "\nA:",
        TokenIds((5, 6)),
        "\n",
        "Q: ",
        "again",
        "\nA:",
    ]
    assert dialogue_pieces(turns, DialogueSpec(), [7, 8])[4] == TokenIds((5, 7, 8, 6))  # the default keeps them
    untokenized = [Turn("user", ["hi"]), Turn("assistant", ["look", ImageSegment(images[1], "retrieved"), "there"])]
    assert dialogue_pieces(untokenized, omit, [7, 8])[-2:] == ["look", "there"]


def test_keys_and_common_prefix(images):
    a, b = ImageSegment(images[0]), ImageSegment(images[1])
    p = Prompt([(1, 2), a, (3,)], n_visual=2)
    assert p.keys == [1, 2, (a.key, 0), (a.key, 1), 3]
    q = Prompt([(1, 2), b, (3,)], n_visual=2)
    assert p.common_prefix(q.keys) == 2
    assert p.common_prefix(p.keys + [9]) == 5
    assert ImageSegment(images[0].copy()).key == a.key  # content, not identity


def test_partial_embedding_equals_the_slice_of_the_full_one(tiny_gill, images):
    m = tiny_gill.model
    p = encode_pieces(tiny_gill.tokenizer, ["a photo of", ImageSegment(images[0]), "a dog"], m.config.n_visual_tokens)
    cache = VisionCache()
    full = p.embed(m, cache)
    assert full.shape[0] == len(p)
    for start in (0, 3, len(p.parts[0]) + 2, len(p) - 1):
        torch.testing.assert_close(p.embed(m, cache, start=start), full[start:])
    assert cache.n_encoded == 1
    # the image positions are the input mapping of the vision features
    n0 = len(p.parts[0])
    feats = m.encode_images(m.vision.processor([images[0]]))
    torch.testing.assert_close(full[n0 : n0 + 4], m.visual_tokens(feats)[0])


def test_vision_cache_encodes_each_image_once(tiny_fromage, images):
    calls = []
    m = tiny_fromage.model
    cache = VisionCache(max_items=2)
    orig = m.encode_images

    def counting(px):
        calls.append(px.shape[0])
        return orig(px)

    m.encode_images = counting
    try:
        segs = [ImageSegment(i) for i in images[:2]]
        f1 = cache.features(m, segs)
        f2 = cache.features(m, [ImageSegment(images[1].copy()), segs[0]])
        torch.testing.assert_close(f2, f1[[1, 0]])
        assert calls == [2] and cache.n_encoded == 2
        cache.features(m, [ImageSegment(images[2])])  # evicts the least recently used
        assert len(cache) == 2 and segs[1].key not in cache
    finally:
        del m.encode_images


def test_normalize_message(images, tmp_path):
    out = normalize_message(["hi", images[0], ""])
    assert out[0] == "hi" and isinstance(out[1], ImageSegment) and len(out) == 2
    path = tmp_path / "x.png"
    images[1].save(path)
    assert isinstance(normalize_message([path])[0], ImageSegment)
    assert normalize_message("just text") == ["just text"]
    for empty in ([], [""], ["   "]):
        with pytest.raises(ValueError, match="empty"):
            normalize_message(empty)
    with pytest.raises(ImageError, match="empty"):
        normalize_message(["hi", b""])
    with pytest.raises(ImageError, match="not a readable image"):
        normalize_message(["hi", b"definitely not a png"])
    with pytest.raises(ValueError, match="item 1 is a int"):
        normalize_message(["hi", 3])
    with pytest.raises(ValueError, match="source"):
        ImageSegment(Image.new("RGB", (2, 2)), source="found")
