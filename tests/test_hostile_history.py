"""An exported conversation from someone else is read as strictly as live input: bounded JSON (bytes, depth,
values, no NaN), role order, images per message and per conversation counted before any is decoded, finite scores,
images through ``load_image`` and kept small; ``Chat.send`` applies the same image limits (issue 17, finding 5)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from fromage_gill.generate import Chat
from fromage_gill.generate.history import FORMAT, VERSION, history_from_dict, read_history_json
from fromage_gill.generate.limits import MAX_IMAGES_PER_CONVERSATION, MAX_IMAGES_PER_MESSAGE
from fromage_gill.generate.prompt import MAX_KEPT_IMAGE_PIXELS, ImageSegment, Turn, kept_image, normalize_message
from fromage_gill.images import ImageError
from fromage_gill.settings import GenerationSettings

TEXT = GenerationSettings(max_new_tokens=2, mode="text", stop_at_eos=False, stop_strings=())


def png(size=(4, 4), colour=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_seg(data: str | None = None, **kw) -> dict:
    return {"type": "image", "png": png() if data is None else data, **kw}


def user(*segs) -> dict:
    return {"role": "user", "segments": [{"type": "text", "text": "look"}, *segs]}


def answer(*segs) -> dict:
    return {"role": "assistant", "segments": list(segs)}


def saved(*turns) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": "tiny-gill", "turns": list(turns)}


def load(data: dict) -> list[Turn]:
    return history_from_dict(data, model="tiny-gill", vocab_size=1000)


# ---------------------------------------------------------------------------------------------- the JSON text


def test_deep_nesting_is_refused_before_json_loads_recurses():
    for text in ("[" * 200_000 + "]" * 200_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        with pytest.raises(ValueError, match="nests more than 16 levels deep"):
            read_history_json(text.encode())
    # brackets inside strings are text, not nesting
    ok = json.dumps(saved(user(), answer({"type": "text", "text": "[[[[" * 50 + "{{{{" * 50})))
    assert read_history_json(ok)["turns"][1]["segments"][0]["text"].startswith("[[[[")


def test_size_value_count_nan_and_non_utf8_are_refused():
    with pytest.raises(ValueError, match="more than the limit of 100 bytes"):
        read_history_json(b" " * 101, max_bytes=100)
    with pytest.raises(ValueError, match="more than 1,000 JSON values"):
        read_history_json(("[" + "[]," * 2000 + "[]]").encode(), max_values=1000)
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match=f"holds {constant}"):
            read_history_json(f'{{"score": {constant}}}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_history_json(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_history_json(b'{"a": ')


# ---------------------------------------------------------------------------------------------- the turns


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ([answer(), user()], r"turns\[0\] is a assistant turn where a user turn must be"),
        ([user(), user(), answer()], r"turns\[1\] is a user turn where a assistant turn must be"),
        ([user()], "without its answer"),
        ([{"role": "user", "segments": [{"type": "text", "text": "  "}]}, answer()], "empty user message"),
    ],
)
def test_role_order_is_that_of_a_live_conversation(turns, match):
    with pytest.raises(ValueError, match=match):
        load(saved(*turns))


def test_images_per_message_are_counted_before_any_is_decoded():
    broken = image_seg("!!not base64!!")  # decoding any of them would raise a base64 error instead
    with pytest.raises(ValueError, match=r"turns\[0\] holds 300 images, more than the limit of 8 per message"):
        load(saved(user(*[broken] * 300), answer()))
    with pytest.raises(ValueError, match=r"turns\[1\] holds 9 images, more than the limit of 8"):
        load(saved(user(), answer(*[broken] * 9)))
    assert len(load(saved(user(*[image_seg()] * MAX_IMAGES_PER_MESSAGE), answer()))[0].images) == 8


def test_images_per_conversation_are_bounded_as_live():
    full = [t for _ in range(MAX_IMAGES_PER_CONVERSATION // 8) for t in (user(*[image_seg()] * 8), answer())]
    assert sum(len(t.images) for t in load(saved(*full))) == 64
    # an answer may still add images after the 64th (live, it can), but no further message is accepted
    with_answer = [*full[:-1], answer(image_seg(source="retrieved"))]
    assert sum(len(t.images) for t in load(saved(*with_answer))) == 65
    with pytest.raises(ValueError, match=r"turns\[16\]: the conversation holds 64 images.*at most 64"):
        load(saved(*full, user(image_seg()), answer()))
    with pytest.raises(ValueError, match=r"turns\[16\]: the conversation holds 64 images"):
        load(saved(*full, user(), answer()))


@pytest.mark.parametrize(
    ("seg", "match"),
    [
        (image_seg(score=float("nan")), "score is nan: a score must be a finite number"),
        (image_seg(score=float("inf")), "score is inf"),
        (image_seg(decision=[float("nan"), 0.5]), "two probabilities in"),
        (image_seg(decision=[1.5, -0.5]), "two probabilities in"),
        (image_seg(source="root"), "source must be one of user, retrieved, generated"),
        (image_seg(png(size=(3000, 10))), "times longer than it is wide"),  # load_image's aspect limit
    ],
)
def test_each_field_is_checked_as_live_input(seg, match):
    with pytest.raises(ValueError, match=match):
        load(saved(user(seg), answer()))


def test_a_big_imported_image_is_kept_small():
    turns = load(saved(user(image_seg(png(size=(2400, 1500)))), answer()))
    kept = turns[0].images[0].image
    assert kept.width * kept.height <= MAX_KEPT_IMAGE_PIXELS and kept.width / kept.height == pytest.approx(1.6, 0.01)
    assert kept.getpixel((10, 10)) == (200, 30, 30)
    small = Image.new("RGB", (100, 50))
    assert kept_image(small) is small  # what fits is kept as it is


# ---------------------------------------------------------------------------------------------- live input


def test_normalize_message_passes_image_segments_through_load_image():
    deep = Image.new("I;16", (8, 8), 4096)  # 16-bit greyscale: Pillow alone would clip it to white
    assert normalize_message([ImageSegment(deep)])[0].image.getpixel((0, 0)) == (16, 16, 16)
    with pytest.raises(ImageError, match="times longer than it is wide"):
        normalize_message([ImageSegment(Image.new("RGB", (4000, 20)))])
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    seg = normalize_message([ImageSegment(rgba, source="retrieved", score=0.5)])[0]
    assert seg.image.mode == "RGB" and seg.image.getpixel((0, 0)) == (255, 255, 255)  # composited, as uploads
    assert seg.source == "retrieved" and seg.score == 0.5
    ok = Image.new("RGB", (8, 8))
    assert normalize_message([ImageSegment(ok)])[0].image is ok


def test_chat_send_applies_the_image_limits(tiny_gill):
    chat = Chat(tiny_gill)
    img = Image.new("RGB", (8, 8), (9, 9, 9))
    with pytest.raises(ValueError, match="holds 9 images, more than the limit of 8 per message"):
        chat.send(["look", *[img] * 9], TEXT)
    chat.history = [
        t
        for _ in range(MAX_IMAGES_PER_CONVERSATION // 8)
        for t in (Turn("user", ["x", *[ImageSegment(img)] * 8]), Turn("assistant", ["y"]))
    ]
    with pytest.raises(ValueError, match="the conversation holds 64 images.*start a new conversation"):
        chat.send(["one more", img], TEXT)
    chat.history[-2] = Turn("user", ["x", ImageSegment(img)])  # 57 images: 7 more fit, 8 do not
    with pytest.raises(ValueError, match="holds 57 images and the message adds 8"):
        chat.send(["look", *[img] * 8], TEXT)
    with pytest.raises(ValueError, match="max_images=9 is more than the limit of 8"):
        chat.send(["look"], GenerationSettings(max_new_tokens=2, mode="text", max_images=9))


def test_each_image_of_a_message_is_decoded_and_kept_small_in_turn(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGBA", (2400, 1500), (0, 0, 0, 0)).save(big)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    Image.new("RGB", (40, 20)).save(rotated, "JPEG", exif=exif)
    segs = normalize_message(["look", big, rotated.getvalue(), ImageSegment(Image.new("RGB", (3000, 1000)), score=0.2)])
    assert segs[0] == "look" and all(isinstance(s, ImageSegment) for s in segs[1:])
    assert segs[1].image.mode == "RGB" and segs[1].image.getpixel((0, 0)) == (255, 255, 255)  # over white
    assert segs[1].image.width * segs[1].image.height <= MAX_KEPT_IMAGE_PIXELS
    assert segs[2].image.size == (20, 40)  # upright
    assert segs[3].image.size == (2449, 816) and segs[3].score == 0.2
    with pytest.raises(ImageError, match="message item 1"):
        normalize_message(["look", b"not an image"])


def test_chat_keeps_a_big_upload_small(tiny_gill):
    chat = Chat(tiny_gill)
    list(chat.send(["look", Image.new("RGB", (2000, 1600), (5, 6, 7))], TEXT))
    kept = chat.history[0].images[0].image
    assert kept.width * kept.height <= MAX_KEPT_IMAGE_PIXELS and kept.size == (1581, 1264)
    back = Chat.from_dict(tiny_gill, json.loads(json.dumps(chat.to_dict())))  # and an export re-imports exactly
    assert back.history[0].images[0].key == chat.history[0].images[0].key
