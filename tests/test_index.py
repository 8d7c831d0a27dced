"""Retrieval index: exact search vs a brute-force reference, FAISS parity, format, build (skips, resume), import."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill import cli
from fromage_gill.images import load_image
from fromage_gill.retrieve import (
    BrokenIndexError,
    FingerprintMismatchError,
    ImageIndex,
    UntrustedPickleError,
    build_index,
    import_published,
    iter_image_caption_items,
    shipped_index_dir,
)
from fromage_gill.retrieve.sources import expand_braces
from fromage_gill.retrieve.storage import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    META_FILE,
    OFFSETS_FILE,
    RECORDS_FILE,
    TENSOR,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def cli_main(argv: list[str]) -> int:
    """The real ``fromage-gill`` entry point, with only this module's sub-command registered (the others are
    other modules' business and must not break these tests)."""
    saved = cli.COMMANDS
    cli.COMMANDS = ["index"]
    try:
        return cli.main(argv)
    finally:
        cli.COMMANDS = saved


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(vectors: np.ndarray, queries: np.ndarray, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
    s = queries.astype(np.float64) @ vectors.astype(np.float64).T
    s[:, list(exclude)] = -np.inf
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def _records(n: int) -> list[dict]:
    return [{"path": f"img{i}.png", "source": "test"} for i in range(n)]


def _embed(pipeline, images: list[Image.Image]) -> torch.Tensor:
    m = pipeline.model
    with torch.no_grad():
        return m.image_embedding(m.encode_images(pipeline.image_processor(images)))


# ------------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("n, k, block", [(1000, 10, 128), (1000, 10, 1 << 20), (50, 60, 16), (7, 3, 2)])
def test_exact_search_matches_brute_force(n, k, block):
    import fromage_gill.retrieve.index as index_mod

    vecs, queries = _unit(n, 32, 0), _unit(5, 32, 1)
    index = ImageIndex.from_embeddings(vecs, _records(n), "test:0")
    exclude = np.unique([1, n // 2, n - 1]).astype(np.int64)  # in several blocks
    res = index_mod.exact_search(index.vectors, torch.from_numpy(queries), k, exclude, block_rows=block)
    m = min(k, n - len(exclude))
    ref_ids, ref_scores = _reference(vecs, queries, m, exclude=exclude.tolist())
    assert np.array_equal(res.ids[:, :m], ref_ids)
    np.testing.assert_allclose(res.scores[:, :m], ref_scores, rtol=0, atol=1e-5)
    if k > m:  # more asked than there are: padded with -1 / -inf
        assert (res.ids[:, m:] == -1).all() and np.isneginf(res.scores[:, m:]).all()
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32


def test_search_excludes_ids_and_accepts_tensors():
    vecs = _unit(300, 16, 2)
    index = ImageIndex.from_embeddings(torch.from_numpy(vecs), _records(300), "test:0")
    q = torch.from_numpy(vecs[[5, 17]])  # each query is an indexed vector: its own top-1 unless excluded
    assert index.search(q, 1).ids[:, 0].tolist() == [5, 17]
    res = index.search(q, 10, exclude={5, 17, 123})
    ref_ids, _ = _reference(vecs, vecs[[5, 17]], 10, exclude=(5, 17, 123))
    assert np.array_equal(res.ids, ref_ids)
    assert index.search(vecs[5], 1).ids.shape == (1, 1)  # a single (D,) query
    small = ImageIndex.from_embeddings(vecs[:3], _records(3), "test:0")
    res = small.search(vecs[:1], 3, exclude={0, 1})
    assert res.ids.tolist() == [[2, -1, -1]] and np.isneginf(res.scores[0, 1:]).all()


def test_search_checks_its_arguments():
    index = ImageIndex.from_embeddings(_unit(10, 8), _records(10), "test:0")
    with pytest.raises(ValueError, match=r"queries must be \(Q, 8\)"):
        index.search(np.zeros((1, 9), np.float32), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(_unit(1, 8), 0)
    with pytest.raises(ValueError, match="no FAISS index"):
        index.search(_unit(1, 8), 1, method="faiss")
    with pytest.raises(ValueError, match="L2-normalised"):
        ImageIndex.from_embeddings(np.ones((3, 8), np.float32), _records(3), "test:0")
    with pytest.raises(ValueError, match="one record per row"):
        ImageIndex.from_embeddings(_unit(3, 8), _records(2), "test:0")
    norm = ImageIndex.from_embeddings(np.ones((3, 8), np.float32) * 3, _records(3), "test:0", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(norm.vectors, axis=1), 1, atol=1e-6)


def test_faiss_flat_agrees_with_brute_force_on_ids(tmp_path):
    pytest.importorskip("faiss")
    vecs, queries = _unit(5000, 64, 3), _unit(16, 64, 4)
    index = ImageIndex.from_embeddings(vecs, _records(5000), "test:0")
    exact = index.search(queries, 10, method="exact")
    index.build_faiss("flat")
    flat = index.search(queries, 10, method="faiss")
    assert np.array_equal(flat.ids, exact.ids)
    np.testing.assert_allclose(flat.scores, exact.scores, atol=1e-5)
    ex = set(exact.ids[:, 0].tolist())  # exclusions: over-fetch then filter
    assert np.array_equal(
        index.search(queries, 10, ex, method="faiss").ids, index.search(queries, 10, ex, method="exact").ids
    )
    index.save(tmp_path / "ix")  # saved beside the vectors, used by "auto" after loading
    loaded = ImageIndex.load(tmp_path / "ix")
    assert loaded.faiss_settings == {"kind": "flat"} and (tmp_path / "ix" / "faiss.index").is_file()
    assert np.array_equal(loaded.search(queries, 10).ids, exact.ids)


@pytest.mark.parametrize("kind, kwargs", [("ivf", {"nlist": 16, "nprobe": 16}), ("hnsw", {"ef_search": 256})])
def test_faiss_approximate_indexes(kind, kwargs, tmp_path):
    pytest.importorskip("faiss")
    vecs = _unit(2000, 32, 5)
    index = ImageIndex.from_embeddings(vecs, _records(2000), "test:0")
    index.build_faiss(kind, **kwargs)
    queries = vecs[:20]
    res = index.search(queries, 5)
    assert (res.ids[:, 0] == np.arange(20)).all()  # nprobe = nlist is exhaustive; HNSW finds exact duplicates
    res = index.search(queries, 5, exclude=set(range(20)))
    assert not np.isin(res.ids, np.arange(20)).any()
    recall = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(res.ids, _reference(vecs, queries, 5, range(20))[0], strict=True)]
    )
    assert recall >= 0.9
    index.save(tmp_path / kind)
    assert ImageIndex.load(tmp_path / kind).faiss_settings["kind"] == kind


# ------------------------------------------------------------------------------------------ format


def test_save_load_round_trip_memory_maps(tmp_path):
    vecs = _unit(100, 16, 6)
    recs = [{"url": f"https://example.org/{i}.jpg", "caption": f"pic {i} \u00e9\n"} for i in range(100)]
    ImageIndex.from_embeddings(vecs, recs, "tiny-x:abc").save(tmp_path)
    index = ImageIndex.load(tmp_path, expected_fingerprint="tiny-x:abc")
    assert isinstance(index.vectors, np.memmap)  # no copy on open
    assert len(index) == 100 and index.dim == 16 and index.fingerprint == "tiny-x:abc" and index.model == "tiny-x"
    assert np.array_equal(np.asarray(index.vectors), vecs)
    assert index.record(42) == recs[42]
    with pytest.raises(IndexError):
        index.record(100)
    from safetensors import safe_open  # the file is ordinary safetensors

    with safe_open(str(tmp_path / EMBEDDINGS_FILE), "np") as f:
        assert np.array_equal(f.get_tensor("embeddings"), vecs)
        assert f.metadata()["fingerprint"] == "tiny-x:abc"
    meta = json.loads((tmp_path / "index.json").read_text())
    assert (meta["count"], meta["dim"], meta["dtype"]) == (100, 16, "float32")
    eager = ImageIndex.load(tmp_path, mmap=False)
    assert not isinstance(eager.vectors, np.memmap) and np.array_equal(eager.vectors, vecs)


def test_float16_storage(tmp_path):
    vecs = _unit(200, 16, 7)
    ImageIndex.from_embeddings(vecs.astype(np.float16), _records(200), "t:0").save(tmp_path)
    index = ImageIndex.load(tmp_path)
    assert index.dtype == "float16"
    res = index.search(vecs[:10], 1)
    assert (res.ids[:, 0] == np.arange(10)).all() and np.allclose(res.scores[:, 0], 1, atol=2e-3)


def test_another_models_index_is_refused_naming_both(tmp_path):
    ImageIndex.from_embeddings(_unit(4, 8), _records(4), "tiny-gill:1111").save(tmp_path)
    with pytest.raises(FingerprintMismatchError) as e:
        ImageIndex.load(tmp_path, expected_fingerprint="tiny-fromage:2222")
    assert "tiny-gill:1111" in str(e.value) and "tiny-fromage:2222" in str(e.value)


def test_missing_or_inconsistent_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an image index"):
        ImageIndex.load(tmp_path)
    ImageIndex.from_embeddings(_unit(4, 8), _records(4), "t:0").save(tmp_path / "a")
    ImageIndex.from_embeddings(_unit(5, 8), _records(5), "t:0").save(tmp_path / "b")
    (tmp_path / "b" / EMBEDDINGS_FILE).replace(tmp_path / "a" / EMBEDDINGS_FILE)
    with pytest.raises(ValueError, match="inconsistent"):
        ImageIndex.load(tmp_path / "a")


# ------------------------------------------------------------------------------------------ sources


def test_a_long_cell_in_a_headerless_cc3m_tsv_names_the_line(tmp_path):
    # CC3M's TSV has no header: its first row is data, chained back before the csv reader's rows. The error must
    # still name the reader's line (the chain has no line_num: this was an AttributeError in the error's handler).
    long = "a red circle " * 11_000  # 143,000 characters: over csv's 131,072
    (tmp_path / "cc3m.tsv").write_text(
        f"a red car\thttps://x.org/1.jpg\nok\thttps://x.org/2.jpg\n{long}\thttps://x.org/3.jpg\n"
    )
    with pytest.raises(ValueError, match=r"cc3m\.tsv:3: field larger than field limit"):
        list(iter_image_caption_items(tmp_path / "cc3m.tsv"))


def test_sources_read_lists_tables_and_shards(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# comment\na.jpg\nhttps://example.org/b.png\na dog\thttp://example.org/c.jpg\n")
    items = list(iter_image_caption_items(tmp_path / "list.txt"))
    assert [(i.path, i.url, i.caption) for i in items] == [
        (str(tmp_path / "a.jpg"), None, None),
        (None, "https://example.org/b.png", None),
        (None, "http://example.org/c.jpg", "a dog"),
    ]
    (tmp_path / "cc3m.tsv").write_text("a red car\thttps://x.org/1.jpg\na cat, sleeping\thttps://x.org/2.jpg\n")
    items = list(iter_image_caption_items(tmp_path / "cc3m.tsv"))
    assert [(i.caption, i.url) for i in items] == [
        ("a red car", "https://x.org/1.jpg"),
        ("a cat, sleeping", "https://x.org/2.jpg"),
    ]
    (tmp_path / "t.csv").write_text('filepath,title,license\nsub/a.jpg,"a, b",CC0\n')
    (item,) = iter_image_caption_items(tmp_path / "t.csv", image_root="/data")
    assert (item.path, item.caption, item.license) == ("/data/sub/a.jpg", "a, b", "CC0")
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no image column"):
        list(iter_image_caption_items(tmp_path / "bad.csv"))
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        list(iter_image_caption_items(tmp_path / "nope"))


def _png_bytes(seed: int, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    _pattern(seed, size).save(buf, "PNG")
    return buf.getvalue()


def _pattern(seed: int, size=(40, 32)) -> Image.Image:
    """Distinct images: a random colour field with a random rectangle and gradient, so embeddings differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 4
    arr += (np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 190, 3)).astype(np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def _write_shard(path: Path, n: int, seed0: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (
                (".jpg", _png_bytes(seed0 + i)),
                (".txt", f"caption {i}".encode()),
                (".json", json.dumps({"url": f"https://x.org/{i}.jpg", "license": "CC0"}).encode()),
            ):
                info = tarfile.TarInfo(f"{i:06d}{ext}")  # img2dataset names: key.jpg / key.txt / key.json
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_build_and_fetch(tiny_fromage, tmp_path):
    _write_shard(tmp_path / "00000.tar", 3, 100)
    _write_shard(tmp_path / "00001.tar", 2, 200)
    items = list(iter_image_caption_items(str(tmp_path / "{00000..00001}.tar")))
    assert [i.caption for i in items] == ["caption 0", "caption 1", "caption 2", "caption 0", "caption 1"]
    assert items[0].license == "CC0" and items[0].member == "000000.jpg" and items[0].offset is not None
    report = build_index(tiny_fromage, str(tmp_path / "{00000..00001}.tar"), tmp_path / "ix", progress=False)
    assert report.count == 5 and not report.skipped
    index = ImageIndex.load(tmp_path / "ix")
    img = index.load_image(3)  # read back from the shard through the recorded member offset
    assert np.array_equal(np.asarray(img), np.asarray(_pattern(200).convert("RGB")))
    q = _embed(tiny_fromage, [_pattern(200)])
    assert index.search(q, 1).ids[0, 0] == 3


# ------------------------------------------------------------------------------------------ build


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> tuple[Path, list[Path], list[str]]:
    """27 good images in nested folders plus corrupt ones, a text file named .jpg, an empty file and a
    20000 x 20000 PNG (a few KB on disk: 1-bit, compressed)."""
    root = tmp_path_factory.mktemp("messy")
    good = []
    for i in range(27):
        sub = root / f"set{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img{i:02d}.{('png', 'jpg', 'webp')[i % 3]}"
        _pattern(i, (40 + i, 32 + 2 * i)).save(p, quality=95) if p.suffix != ".png" else _pattern(i).save(p)
        good.append(p)
    bad = {
        "truncated.jpg": (root / "set0" / "img00.png").read_bytes()[:60],
        "noise.png": np.random.default_rng(0).bytes(500),
        "notes.jpg": b"This is a text file, renamed to .jpg by mistake.\n" * 4,
        "empty.png": b"",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    Image.new("1", (20000, 20000)).save(root / "huge.png")
    (root / "readme.md").write_text("not an image type: ignored, not skipped")
    return root, sorted(good), sorted([*bad, "huge.png"])


def test_build_skips_bad_images_by_name_and_finds_each_good_one(tiny_fromage, messy_folder, tmp_path):
    root, good, bad_names = messy_folder
    assert (root / "huge.png").stat().st_size < 200_000  # the bomb is tiny on disk
    report = build_index(tiny_fromage, root, tmp_path / "ix", batch_size=8, progress=False)
    assert report.count == len(good)
    assert sorted(Path(name).name for name, _ in report.skipped) == bad_names
    reasons = {Path(n).name: r for n, r in report.skipped}
    assert "pixels" in reasons["huge.png"] and "empty" in reasons["empty.png"]
    assert (tmp_path / "ix" / "skipped.tsv").read_text().count("\n") == len(bad_names)

    index = ImageIndex.load(tmp_path / "ix", expected_fingerprint=tiny_fromage.model.retrieval_fingerprint())
    paths = [(tmp_path / "ix" / index.record(i)["path"]).resolve() for i in range(len(index))]
    assert sorted(paths) == [p.resolve() for p in good]
    queries = _embed(tiny_fromage, [load_image(p) for p in paths])  # each image embedded on its own
    res = index.search(queries, 2)
    assert (res.ids[:, 0] == np.arange(len(index))).all()
    assert np.allclose(res.scores[:, 0], 1, atol=1e-5) and (res.scores[:, 1] < res.scores[:, 0]).all()
    rec = index.record(0)
    assert len(rec["sha256"]) == 64 and rec["license"] == "unknown" and rec["source"] == str(root)
    assert rec["sha256"] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(tiny_fromage, root, tmp_path / "ix", progress=False)


def test_cli_build_lists_skipped_images_by_name(messy_folder, tmp_path, capsys):
    root, good, bad_names = messy_folder
    assert (
        cli_main(
            [
                "index",
                "build",
                "--model",
                "tiny-fromage",
                "--device",
                "cpu",
                "--images",
                str(root),
                "--out",
                str(tmp_path / "ix"),
                "--no-progress",
                "--storage-dtype",
                "float16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{len(good)} images indexed, {len(bad_names)} skipped" in out
    assert all(f"skipped {root / name}:" in out for name in bad_names)
    assert ImageIndex.load(tmp_path / "ix").dtype == "float16"


def test_interrupted_build_resumes_without_redoing_batches(make_pipeline, tmp_path):
    pipeline = make_pipeline("tiny-fromage")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        _pattern(1000 + i).save(folder / f"{i:02d}.png")
    model = pipeline.model
    real = model.image_embedding
    calls = []

    def failing(features):
        calls.append(len(features))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the third batch
        return real(features)

    model.image_embedding = failing
    with pytest.raises(KeyboardInterrupt):
        build_index(pipeline, folder, tmp_path / "ix", batch_size=4, progress=False)
    state = json.loads((tmp_path / "ix" / ".build" / "state.json").read_text())
    assert (state["items_done"], state["rows"]) == (8, 8)
    with pytest.raises(FileNotFoundError, match="resume"):
        ImageIndex.load(tmp_path / "ix")

    calls.clear()
    model.image_embedding = lambda f: (calls.append(len(f)), real(f))[1]
    report = build_index(pipeline, folder, tmp_path / "ix", batch_size=4, progress=False)
    assert calls == [4, 4, 4] and report.resumed_from == 8 and report.count == 20  # batches 3-5 only
    model.image_embedding = real
    fresh = build_index(pipeline, folder, tmp_path / "fresh", batch_size=4, progress=False)
    a, b = ImageIndex.load(tmp_path / "ix"), ImageIndex.load(tmp_path / "fresh")
    assert fresh.count == 20 and np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert [a.record(i)["path"] for i in range(20)] == [b.record(i)["path"].replace("fresh", "ix") for i in range(20)]
    assert not (tmp_path / "ix" / ".build").exists()


def test_fetch_first_falls_through_missing_local_files(tmp_path):
    _pattern(5).save(tmp_path / "ok.png")
    index = ImageIndex.from_embeddings(
        _unit(3, 8), [{"path": str(tmp_path / "gone.png")}, {"path": str(tmp_path / "ok.png")}, {"path": "x"}], "t:0"
    )
    found = index.fetch_first([0, 1, 2])
    assert found is not None and found[0] == 1 and found[1].size == (40, 32)
    assert index.fetch_first([0, 2]) is None


# ------------------------------------------------------------------------------------------ import


def _published(path: Path, n: int, d: int, *, tensors: bool = False) -> np.ndarray:
    raw = np.random.default_rng(9).standard_normal((n, d)).astype(np.float32) * 3  # not normalised, as published
    emb = [torch.from_numpy(r).bfloat16() for r in raw] if tensors else raw
    with open(path, "wb") as f:
        pickle.dump({"paths": [f"https://cc3m.example/{i}.jpg" for i in range(n)], "embeddings": emb}, f)
    return raw


def test_published_pickle_needs_trust(tmp_path, capsys):
    _published(tmp_path / "cc3m_embeddings_urls.npy", 5, 16)
    with pytest.raises(UntrustedPickleError, match="can run arbitrary code"):
        import_published(
            [tmp_path / "cc3m_embeddings_urls.npy"], tmp_path / "ix", fingerprint="f:1", trust_pickle=False
        )
    code = cli_main(
        [
            "index",
            "import",
            str(tmp_path / "cc3m_embeddings_urls.npy"),
            "--out",
            str(tmp_path / "ix"),
            "--fingerprint",
            "f:1",
        ]
    )
    assert code == 2 and "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "ix").exists()


def test_published_pickle_imports_with_trust(tiny_fromage, tmp_path):
    raw = _published(tmp_path / "cc3m_embeddings.pkl", 50, 16)
    assert (
        cli_main(
            [
                "index",
                "import",
                str(tmp_path / "cc3m_embeddings.pkl"),
                "--out",
                str(tmp_path / "ix"),
                "--trust-pickle",
                "--model",
                "tiny-fromage",
            ]
        )
        == 0
    )
    index = ImageIndex.load(tmp_path / "ix", expected_fingerprint=tiny_fromage.model.retrieval_fingerprint())
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(index.vectors), expected, atol=1e-6)
    assert index.record(7) == {
        "url": "https://cc3m.example/7.jpg",
        "source": "cc3m",
        "license": index.record(7)["license"],
    }
    assert index.search(expected[:4], 1).ids[:, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="16-d embeddings but the model's retrieval space is 8-d"):
        import_published(
            [tmp_path / "cc3m_embeddings.pkl"], tmp_path / "ix2", fingerprint="f", trust_pickle=True, expected_dim=8
        )


def test_extraction_script_lists_of_tensors_import(tmp_path):
    raw = _published(tmp_path / "a.pkl", 6, 16, tensors=True)
    _published(tmp_path / "b.pkl", 6, 16)
    report = import_published(
        [tmp_path / "a.pkl", tmp_path / "b.pkl"], tmp_path / "ix", fingerprint="m:1", trust_pickle=True
    )
    assert report.count == 12 and report.dim == 16
    index = ImageIndex.load(tmp_path / "ix", expected_fingerprint="m:1")
    bf16 = torch.from_numpy(raw).bfloat16().float().numpy()
    np.testing.assert_allclose(index.vectors[:6], bf16 / np.linalg.norm(bf16, axis=1, keepdims=True), atol=1e-6)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_trusted_pickle_still_cannot_call_arbitrary_functions(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"paths": ["a"], "embeddings": _Evil()}, f)
    with pytest.raises(ValueError, match="asks for posix.system|asks for os.system"):
        import_published([tmp_path / "evil.pkl"], tmp_path / "ix", fingerprint="f", trust_pickle=True)


# ------------------------------------------------------------------------------------------ shipped indexes & CLI


@pytest.mark.parametrize("name", ["tiny-fromage", "tiny-gill"])
def test_shipped_index_matches_its_preset(name, request):
    pipeline = request.getfixturevalue(name.replace("-", "_"))
    d = shipped_index_dir(name)
    assert d is not None, f"assets/indexes/{name} is missing: rebuild it (see notes)"
    index = ImageIndex.load(d, expected_fingerprint=pipeline.model.retrieval_fingerprint())
    assert len(index) == 8
    images = [index.load_image(i) for i in range(len(index))]  # relative paths resolve from the index folder
    res = index.search(_embed(pipeline, images), 1)
    assert (res.ids[:, 0] == np.arange(8)).all()
    assert all(index.record(i)["license"] for i in range(8))


def test_cli_info_and_search(tmp_path, capsys):
    d = shipped_index_dir("tiny-fromage")
    assert cli_main(["index", "info", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 8 and info["fingerprint"].startswith("tiny-fromage:")
    assert (
        cli_main(
            [
                "index",
                "search",
                str(d),
                "--model",
                "tiny-fromage",
                "--device",
                "cpu",
                "--image",
                str(ASSETS / "images" / "chelsea.jpg"),
                "-k",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert "chelsea.jpg" in out[0] and "1.0000" in out[0] and len(out) == 2
    assert cli_main(["index", "search", str(d), "--model", "tiny-gill", "--device", "cpu", "--text", "a cat"]) == 2
    assert "tiny-gill:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ broken index files


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite_header(path: Path, edit) -> None:
    header, data = _header(path)
    edit(header[TENSOR])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / META_FILE).read_text())
    meta.update(changes)
    (d / META_FILE).write_text(json.dumps(meta))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BROKEN = {  # what breaks the folder -> (the file the error must name, words it must say)
    "truncated embeddings": (
        lambda d: _truncate(d / EMBEDDINGS_FILE, -100 + (d / EMBEDDINGS_FILE).stat().st_size),
        EMBEDDINGS_FILE,
        "truncated",
    ),
    "embeddings cut inside the header": (lambda d: _truncate(d / EMBEDDINGS_FILE, 40), EMBEDDINGS_FILE, "truncated"),
    "embeddings of 3 bytes": (lambda d: _truncate(d / EMBEDDINGS_FILE, 3), EMBEDDINGS_FILE, "too short"),
    "embeddings with trailing bytes": (
        lambda d: (d / EMBEDDINGS_FILE).write_bytes((d / EMBEDDINGS_FILE).read_bytes() + b"\0" * 64),
        EMBEDDINGS_FILE,
        "longer than its header",
    ),
    "header shape larger than the data": (
        lambda d: _rewrite_header(d / EMBEDDINGS_FILE, lambda t: t.update(shape=[7, 8])),
        EMBEDDINGS_FILE,
        "data_offsets",
    ),
    "header dtype F64": (
        lambda d: _rewrite_header(d / EMBEDDINGS_FILE, lambda t: t.update(dtype="F64")),
        EMBEDDINGS_FILE,
        "F32 or F16",
    ),
    "header shape 1-D": (
        lambda d: _rewrite_header(d / EMBEDDINGS_FILE, lambda t: t.update(shape=[48])),
        EMBEDDINGS_FILE,
        "2-D",
    ),
    "header not JSON": (
        lambda d: (d / EMBEDDINGS_FILE).write_bytes(struct.pack("<Q", 8) + b"{not js}" + b"\0" * 192),
        EMBEDDINGS_FILE,
        "header",
    ),
    "index.json says float16, the file is float32": (
        lambda d: _edit_meta(d, dtype="float16"),
        EMBEDDINGS_FILE,
        "float16",
    ),
    "index.json says 5 rows, the file holds 6": (lambda d: _edit_meta(d, count=5), EMBEDDINGS_FILE, "inconsistent"),
    "index.json dtype unknown": (lambda d: _edit_meta(d, dtype="int8"), META_FILE, "dtype"),
    "index.json without count": (lambda d: _edit_meta(d, count=None), META_FILE, "'count'"),
    "index.json not JSON": (lambda d: (d / META_FILE).write_text('{"format": '), META_FILE, "not valid JSON"),
    "index.json a list": (lambda d: (d / META_FILE).write_text("[1, 2]"), META_FILE, "JSON object"),
    "offsets garbage": (lambda d: (d / OFFSETS_FILE).write_bytes(b"garbage" * 10), OFFSETS_FILE, "delete it"),
    "offsets of another records file": (
        lambda d: np.save(d / OFFSETS_FILE, np.arange(7, dtype=np.int64) * 3),
        OFFSETS_FILE,
        "does not fit",
    ),
    "one record missing": (
        lambda d: (
            (d / RECORDS_FILE).write_bytes(b"".join((d / RECORDS_FILE).read_bytes().splitlines(True)[:-1])),
            (d / OFFSETS_FILE).unlink(),
        ),
        RECORDS_FILE,
        "5 records for 6",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_broken_index_file_is_named_with_the_fix(case, tmp_path):
    d = tmp_path / "index"
    ImageIndex.from_embeddings(_unit(6, 8), _records(6), "t:0").save(d)
    breaker, name, words = BROKEN[case]
    breaker(d)
    with pytest.raises(BrokenIndexError) as e:
        ImageIndex.load(d)
    message = str(e.value)
    assert str(d / name) in message and words in message, message
    assert f"fromage-gill index build --model MODEL --images IMAGES --out {d} --overwrite" in message
    assert "mmap length" not in message


@pytest.mark.parametrize("name", [EMBEDDINGS_FILE, RECORDS_FILE])
def test_a_missing_index_file_is_named_with_the_fix(name, tmp_path):
    ImageIndex.from_embeddings(_unit(6, 8), _records(6), "t:0").save(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError) as e:
        ImageIndex.load(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "fromage-gill index build" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [META_FILE, EMBEDDINGS_FILE, RECORDS_FILE])
def test_an_unreadable_index_file_is_named(name, tmp_path, monkeypatch):
    import builtins

    import fromage_gill.retrieve.storage as storage

    ImageIndex.from_embeddings(_unit(6, 8), _records(6), "t:0").save(tmp_path)
    denied = tmp_path / name

    def refuse(path):
        if Path(path) == denied:  # what the OS says to a process without read permission (tests may run as root)
            raise PermissionError(13, "Permission denied", str(path))

    real_open, real_read = builtins.open, Path.read_bytes
    monkeypatch.setattr(storage, "open", lambda path, *a, **k: refuse(path) or real_open(path, *a, **k), raising=False)
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse(self) or real_read(self))
    with pytest.raises(BrokenIndexError, match="cannot be read [(]Permission denied[)]") as e:
        ImageIndex.load(tmp_path)
    assert str(denied) in str(e.value)


def test_a_broken_faiss_index_is_named_with_the_fix(tmp_path):
    pytest.importorskip("faiss")
    index = ImageIndex.from_embeddings(_unit(6, 8), _records(6), "t:0")
    index.build_faiss("flat")
    index.save(tmp_path)
    _truncate(tmp_path / FAISS_FILE, 20)
    with pytest.raises(BrokenIndexError) as e:
        ImageIndex.load(tmp_path)
    assert str(tmp_path / FAISS_FILE) in str(e.value) and f"fromage-gill index faiss {tmp_path}" in str(e.value)
    assert len(ImageIndex.load(tmp_path, use_faiss=False)) == 6  # exact search still opens it


def test_cli_names_a_truncated_index_in_one_line(tmp_path, capsys):
    ImageIndex.from_embeddings(_unit(6, 8), _records(6), "t:0").save(tmp_path)
    _truncate(tmp_path / EMBEDDINGS_FILE, (tmp_path / EMBEDDINGS_FILE).stat().st_size - 8)
    assert cli_main(["index", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / EMBEDDINGS_FILE) in err and "truncated" in err and "Traceback" not in err
