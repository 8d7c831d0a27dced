"""A damaged index folder is refused with the file named and the fix, not a bare numpy/mmap error (issue 17,
finding 6): every file of the folder truncated, and a safetensors header that lies about its data."""

from __future__ import annotations

import shutil
import struct
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill import load_pipeline
from fromage_gill.cli import main as cli_main
from fromage_gill.retrieve import ImageIndex, build_index, shipped_index_dir, storage
from fromage_gill.retrieve import index as index_module
from fromage_gill.retrieve.exact import exact_search
from fromage_gill.retrieve.storage import EMBEDDINGS_FILE, OFFSETS_FILE, BrokenIndexError


def saved_index(directory):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ImageIndex.from_embeddings(vecs, [{"url": f"https://example.org/{i}.jpg"} for i in range(50)], "t:0").save(
        directory
    )
    return directory


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_embeddings_name_the_file(tmp_path, mmap, keep):
    d = saved_index(tmp_path / "index")
    f = d / EMBEDDINGS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(
        ValueError, match=rf"{EMBEDDINGS_FILE}: is truncated .* bytes.*rebuild the index: `fromage-gill index build"
    ) as e:
        ImageIndex.load(d, mmap=mmap)
    assert str(f) in str(e.value)


def test_truncated_offsets_name_the_file(tmp_path):
    d = saved_index(tmp_path / "index")
    f = d / OFFSETS_FILE
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(
        ValueError, match=rf"{OFFSETS_FILE}: is not a readable .npy array.*delete it to have the offsets recounted"
    ) as e:
        ImageIndex.load(d)
    assert str(f) in str(e.value)


# ------------------------------------------------------------------------------------------ NaN vectors (issue 29)


def _poison_rows(d, rows):
    """Overwrite ``rows`` of a saved float32 index with NaN, in place (what a bad model or a bit flip leaves)."""
    f = d / EMBEDDINGS_FILE
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    data = np.frombuffer(raw, dtype=np.float32, offset=8 + n).reshape(50, 16).copy()
    data[rows] = np.nan
    f.write_bytes(bytes(raw[: 8 + n]) + data.tobytes())


def test_nan_vectors_are_refused_when_the_index_is_made_or_opened(tmp_path):
    vecs = np.full((3, 4), 0.5, dtype=np.float32)
    vecs[1] = np.nan
    with pytest.raises(ValueError, match="embeddings row 1 holds NaN or infinite values"):
        ImageIndex.from_embeddings(vecs, [{}] * 3, "t:0")
    with pytest.raises(ValueError, match="embeddings row 1 holds NaN"):
        ImageIndex.from_embeddings(vecs, [{}] * 3, "t:0", normalize=True)
    d = saved_index(tmp_path / "index")
    _poison_rows(d, [7, 9])
    with pytest.raises(BrokenIndexError, match=r"row 7 holds NaN or infinite values.*rebuild the index: `fromage-gill"):
        ImageIndex.load(d)


@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_a_nan_row_that_opening_did_not_sample_is_refused_by_search(tmp_path, monkeypatch, kernel):
    # An index too large to scan when opened is sampled; the kernels that score every row then meet the NaN (FAISS's
    # own kernel drops NaN rows, so with it such a row is never found but the other results stand)
    monkeypatch.setattr(storage, "FINITE_SCAN_BYTES", 0)
    monkeypatch.setattr(storage, "FINITE_SAMPLE_ROWS", 10)  # rows 0, 5, 10, ... are sampled
    d = saved_index(tmp_path / "index")
    _poison_rows(d, [3])
    index = ImageIndex.load(d)  # the sample misses row 3
    monkeypatch.setattr(index_module, "exact_search", partial(exact_search, kernel=kernel))
    with pytest.raises(BrokenIndexError, match=rf"{EMBEDDINGS_FILE}: row 3 holds NaN.*rebuild the index"):
        index.search(np.asarray(index.vectors[0], dtype=np.float32), 5)
    _poison_rows(d, [0])
    with pytest.raises(BrokenIndexError, match="row 0 holds NaN"):  # row 0 is sampled: refused when opened
        ImageIndex.load(d)


def test_index_search_cli_never_answers_nothing(tmp_path, capsys):
    src = shipped_index_dir("tiny-fromage")
    d = tmp_path / "index"
    shutil.copytree(src, d)
    shutil.copytree(src.parent.parent / "images", tmp_path / "images", dirs_exist_ok=True)
    f = d / EMBEDDINGS_FILE
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n :] = np.full((len(raw) - 8 - n) // 4, np.nan, dtype=np.float32).tobytes()
    f.write_bytes(bytes(raw))
    argv = ["index", "search", str(d), "--model", "tiny-fromage", "--device", "cpu", "--text", "a cat"]
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{f}: row 0 holds NaN" in captured.err and "fromage-gill index build" in captured.err


def test_a_built_index_refuses_a_model_whose_embeddings_are_nan(tmp_path):
    pipe = load_pipeline("tiny-fromage", device="cpu", dtype="fp32")
    with torch.no_grad():
        pipe.model.visual_fc.weight[0, 0] = float("nan")
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / f"img{i}.png")
    with pytest.raises(ValueError, match=r"embedding of .*img0.png holds NaN or infinite values \(and 2 more"):
        build_index(pipe, root, tmp_path / "ix", progress=False, num_workers=1)
    assert not (tmp_path / "ix" / "index.json").exists()


# ------------------------------------------------------------------------------------------ records offsets


def test_offsets_that_do_not_increase_name_the_file(tmp_path):
    d = saved_index(tmp_path / "index")
    offsets = np.load(d / OFFSETS_FILE)
    offsets[[10, 11]] = offsets[[11, 10]]
    np.save(d / OFFSETS_FILE, offsets)
    with pytest.raises(
        BrokenIndexError,
        match=rf"{OFFSETS_FILE}: does not fit records.jsonl: line offsets must increase, but record 10 runs from",
    ):
        ImageIndex.load(d)


def test_offsets_into_the_middle_of_a_line_name_both_files(tmp_path):
    d = saved_index(tmp_path / "index")
    offsets = np.load(d / OFFSETS_FILE)
    offsets[10] += 3  # still increasing: only reading record 9 or 10 shows it
    np.save(d / OFFSETS_FILE, offsets)
    index = ImageIndex.load(d)
    assert index.record(5)["url"].endswith("/5.jpg")
    with pytest.raises(
        BrokenIndexError, match=rf"records.jsonl: record 10 .* is not a JSON line .*delete .*{OFFSETS_FILE}"
    ):
        index.record(10)


def test_index_sources_that_are_not_utf8_or_too_long_a_query_name_the_problem(tmp_path, capsys):
    from fromage_gill.retrieve.sources import iter_image_caption_items

    listing = tmp_path / "images.tsv"
    listing.write_bytes("caption\timage\nun café\ta.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"images.tsv:2: is not UTF-8 text .*iconv -f latin1 -t utf-8"):
        list(iter_image_caption_items(listing))
    d = shipped_index_dir("tiny-fromage")
    long = " ".join(["cat"] * 10_000)
    argv = ["index", "search", str(d), "--model", "tiny-fromage", "--device", "cpu", "--text", long]
    assert cli_main(argv) == 2
    assert "--text is" in capsys.readouterr().err
