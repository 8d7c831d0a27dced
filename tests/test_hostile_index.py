"""A damaged index folder is refused with the file named and the fix, not a bare numpy/mmap error (issue 17,
finding 6): every file of the folder truncated, and a safetensors header that lies about its data."""

from __future__ import annotations

import numpy as np
import pytest

from fromage_gill.retrieve import ImageIndex
from fromage_gill.retrieve.storage import EMBEDDINGS_FILE, OFFSETS_FILE


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
