"""Reading image-caption data: TSV/CSV, caption-sidecar folders, tar shards; skipped examples are counted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from fromage_gill.images import ImageProcessor
from fromage_gill.training.data import (
    DataError,
    ImageCaptionDataset,
    collate,
    load_record_image,
    read_records,
    split_train_val,
)
from fromage_gill.training.synthetic import make_shapes


@pytest.mark.parametrize("fmt", ["tsv", "csv", "folder", "tar"])
def test_every_layout_reads_the_same_examples(tmp_path, fmt):
    data = make_shapes(tmp_path / fmt, 7, fmt=fmt)
    recs = read_records(data)
    assert len(recs) == 7 and recs.skipped.total == 0
    assert [r.caption for r in recs.items] == [make_caption(i) for i in range(7)]
    reference = read_records(make_shapes(tmp_path / "ref", 7, fmt="folder"))
    for got, want in zip(recs.items, reference.items, strict=True):  # same pixels whatever the container
        assert load_record_image(got).tobytes() == load_record_image(want).tobytes()


def make_caption(i: int) -> str:
    from fromage_gill.training.synthetic import COLOURS, SHAPES

    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return "a {} {}".format(*pairs[i % len(pairs)])


def test_missing_and_unreadable_images_are_skipped_and_counted_never_replaced(tmp_path):
    data = make_shapes(tmp_path, 6, fmt="tsv")
    (tmp_path / "images" / "00001.png").unlink()  # missing: known when reading the table
    (tmp_path / "images" / "00002.png").write_bytes(b"not an image")  # unreadable: known when decoding
    recs = read_records(data)
    assert len(recs) == 5 and recs.skipped.counts == {"missing image": 1}
    assert "images/00001.png" in recs.skipped.summary()
    names = [r.key.rsplit("/", 2)[-2] + "/" + r.key.rsplit("/", 1)[-1] for r in recs.items]
    assert "images/00001.png" not in names
    ds = ImageCaptionDataset(recs.items, ImageProcessor(size=16))
    batch = collate([ds[i] for i in range(len(ds))])
    assert [Path(recs.items[i].key).name for i in batch.indices] == ["00000.png", "00003.png", "00004.png", "00005.png"]
    assert batch.captions == [recs.items[i].caption for i in batch.indices]  # captions stay with their images
    assert batch.pixels.shape[0] == 4
    assert [Path(k).name for k, _ in batch.skipped] == ["00002.png"]
    assert "not a readable image" in batch.skipped[0][1]


def test_table_errors_name_the_fix(tmp_path):
    no_caption = tmp_path / "a.tsv"
    no_caption.write_text("text_only\timage\nhello\tx.png\n")
    with pytest.raises(DataError, match="no caption column"):
        read_records(no_caption)
    headerless = tmp_path / "b.tsv"
    headerless.write_text("")
    with pytest.raises(DataError, match="no usable"):
        read_records(headerless)
    data = make_shapes(tmp_path / "ok", 2, fmt="tsv")
    with pytest.raises(FileNotFoundError, match="--image-root"):
        read_records(data, image_root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--data"):
        read_records(tmp_path / "absent.tsv")


def test_no_caption_column_message_is_specific(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("url\timage\nhttp://x\tx.png\n")
    with pytest.raises(DataError) as e:
        read_records(path)
    assert "no caption column" in str(e.value) and "caption" in str(e.value)


def test_a_query_column_is_what_the_image_tokens_follow_and_the_caption_stays(tmp_path):
    """An optional ``query`` column (empty = the caption) reaches every batch as ``queries``; the captions are
    unchanged, and data without queries keeps the fingerprint precomputed features were made with."""
    from fromage_gill.training.data import records_fingerprint

    data = make_shapes(tmp_path / "d", 3, fmt="tsv")
    rows = data.read_text().splitlines()
    plain = read_records(data)
    with_query = tmp_path / "d" / "query.tsv"
    with_query.write_text(
        "\n".join([rows[0] + "\tquery", rows[1] + "\there is a photo of a shape.", rows[2] + "\t", rows[3] + "\t  "])
        + "\n"
    )
    recs = read_records(with_query)
    assert [r.caption for r in recs.items] == [r.caption for r in plain.items]
    assert [r.query for r in recs.items] == ["here is a photo of a shape.", None, None]
    assert [r.image_query for r in recs.items] == ["here is a photo of a shape.", *[r.caption for r in plain.items[1:]]]
    batch = collate([ImageCaptionDataset(recs.items, ImageProcessor(32))[i] for i in range(3)])
    assert batch.captions == [r.caption for r in plain.items]
    assert batch.queries == ["here is a photo of a shape.", *batch.captions[1:]]
    assert records_fingerprint(recs.items) != records_fingerprint(plain.items)
    without = tmp_path / "d" / "noquery.tsv"
    without.write_text("\n".join([rows[0] + "\tquery", *(r + "\t" for r in rows[1:])]) + "\n")
    assert records_fingerprint(read_records(without).items) == records_fingerprint(plain.items)


def test_a_prompt_column_reaches_the_batch_unescaped(tmp_path):
    """An optional ``prompt`` column (its \\n escapes read as newlines; empty = none) reaches every batch as
    ``prompts``; the captions and queries do not change, and the fingerprint follows the prompts."""
    from fromage_gill.training.data import records_fingerprint

    data = make_shapes(tmp_path / "d", 3, fmt="tsv")
    rows = data.read_text().splitlines()
    plain = read_records(data)
    with_prompt = tmp_path / "d" / "prompt.tsv"
    with_prompt.write_text(
        "\n".join([rows[0] + "\tprompt", rows[1] + "\tQ: What is in this image?\\nA:", rows[2] + "\t", rows[3] + "\t "])
        + "\n"
    )
    recs = read_records(with_prompt)
    assert [r.prompt for r in recs.items] == ["Q: What is in this image?\nA:", None, None]
    batch = collate([ImageCaptionDataset(recs.items, ImageProcessor(32))[i] for i in range(3)])
    assert batch.captions == batch.queries == [r.caption for r in plain.items]
    assert batch.prompts == ["Q: What is in this image?\nA:", "", ""]
    assert records_fingerprint(recs.items) != records_fingerprint(plain.items)
    without = tmp_path / "d" / "noprompt.tsv"
    without.write_text("\n".join([rows[0] + "\tprompt", *(r + "\t" for r in rows[1:])]) + "\n")
    assert records_fingerprint(read_records(without).items) == records_fingerprint(plain.items)


def test_a_history_column_reaches_the_batch_unescaped(tmp_path):
    """An optional ``history`` column (a chat's earlier turns; escapes read as newlines, empty = none) reaches every
    batch as ``histories``; the rest does not change, and the fingerprint follows the histories."""
    from fromage_gill.training.data import records_fingerprint

    data = make_shapes(tmp_path / "d", 3, fmt="tsv")
    rows = data.read_text().splitlines()
    plain = read_records(data)
    earlier = "Q: Draw a red ring.\\nA: here is a drawing of a red ring.\\n"
    with_history = tmp_path / "d" / "history.tsv"
    with_history.write_text(
        "\n".join([rows[0] + "\thistory", rows[1] + "\t", rows[2] + f"\t{earlier}", rows[3] + "\t"]) + "\n"
    )
    recs = read_records(with_history)
    assert [r.history for r in recs.items] == [None, "Q: Draw a red ring.\nA: here is a drawing of a red ring.\n", None]
    batch = collate([ImageCaptionDataset(recs.items, ImageProcessor(32))[i] for i in range(3)])
    assert batch.captions == batch.queries == [r.caption for r in plain.items] and batch.prompts == ["", "", ""]
    assert batch.histories == ["", "Q: Draw a red ring.\nA: here is a drawing of a red ring.\n", ""]
    assert records_fingerprint(recs.items) != records_fingerprint(plain.items)
    without = tmp_path / "d" / "nohistory.tsv"
    without.write_text("\n".join([rows[0] + "\thistory", *(r + "\t" for r in rows[1:])]) + "\n")
    assert records_fingerprint(read_records(without).items) == records_fingerprint(plain.items)


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("caption\timage\n")
    with pytest.raises(DataError, match="no usable"):
        read_records(empty)
    only_missing = tmp_path / "missing.tsv"
    only_missing.write_text("caption\timage\na cat\tcat.png\n")
    with pytest.raises(DataError, match="1 missing image"):
        read_records(only_missing)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no usable"):
        read_records(tmp_path / "folder")


def test_tar_shards_with_json_captions_and_orphans(tmp_path):
    path = tmp_path / "s.tar"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="JPEG")
    members = {
        "a/001.jpg": buf.getvalue(),
        "a/001.json": b'{"caption": "a red square"}',
        "a/002.jpg": buf.getvalue(),  # no caption
        "a/003.txt": b"a caption without an image",
    }
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    recs = read_records(tmp_path)  # a folder of shards
    assert [(r.key, r.caption) for r in recs.items] == [(f"{path}:a/001.jpg", "a red square")]
    assert recs.skipped.counts == {"no caption": 1}  # the caption without an image is no example at all
    assert load_record_image(recs.items[0]).getpixel((4, 4))[0] > 200


def test_folder_without_sidecar_is_counted(tmp_path):
    make_shapes(tmp_path, 3, fmt="folder")
    (tmp_path / "00001.txt").unlink()
    recs = read_records(tmp_path)
    assert len(recs) == 2 and recs.skipped.counts == {"no caption": 1}


def test_split_is_fixed_disjoint_and_checked():
    train, val = split_train_val(20, 0.25, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_train_val(20, 0.25, seed=3) == (train, val)
    assert split_train_val(20, 0.0, seed=3) == (list(range(20)), [])
    with pytest.raises(ValueError, match="--val-fraction"):
        split_train_val(20, 1.0, seed=0)
    with pytest.raises(DataError, match="too few"):
        split_train_val(1, 0.5, seed=0)
    assert torch.equal(torch.tensor(train), torch.tensor(sorted(train)))
