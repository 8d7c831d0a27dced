"""Import the authors' published CC3M image embeddings (FROMAGe's ``cc3m_embeddings*.pkl``, GILL's
``cc3m_embeddings_urls.npy``) into an index folder.

Those files are Python pickles, and loading a pickle can run code: nothing is unpickled unless the caller declares
the file trusted (``trust_pickle=True``), and even then only arrays, tensors and containers may be built.
"""

from __future__ import annotations

import io
import itertools
import logging
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .index import ImageIndex
from .sources import is_url
from .storage import META_FILE, normalize_rows

logger = logging.getLogger(__name__)


class UntrustedPickleError(ValueError):
    """A pickle the user has not declared trusted."""


@dataclass
class ImportReport:
    out_dir: Path
    count: int
    dim: int
    dropped: int  # rows with a zero or non-finite vector (cannot be normalised)


CC3M_LICENSE = (
    "unknown: CC3M lists web images by URL; each image belongs to its owner (Google's Conceptual Captions terms)"
)

# What a published embeddings pickle needs: numpy arrays, torch tensors (the extraction scripts' lists), containers.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("collections", "OrderedDict"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
}


class _PublishedUnpickler(pickle.Unpickler):
    """Even a trusted pickle may only build arrays, tensors and containers: anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the pickle asks for {module}.{name}, which an embeddings file never needs; refusing to load it"
        )


def _storage_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=True)  # tensors pickled outside torch.save nest a torch.save


def read_published_embeddings(path: str | Path, *, trust_pickle: bool) -> tuple[list[str], np.ndarray]:
    """(paths, (N, D) float32) from a published ``cc3m_embeddings*.pkl`` / ``cc3m_embeddings_urls.npy`` (a pickle
    of ``{'paths': [...], 'embeddings': array or list of tensors}``)."""
    p = Path(path)
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{p} is a Python pickle, and loading a pickle can run arbitrary code on this machine. Import it only "
            f"if you trust where it came from (the FROMAGe/GILL authors' cc3m_embeddings files), by passing "
            f"trust_pickle=True (--trust-pickle)."
        )
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    logger.warning(
        "loading %s as a pickle (pickles can run code: only trusted files; globals are restricted to "
        "arrays and tensors)",
        p,
    )
    with open(p, "rb") as f:
        try:
            obj = _PublishedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise ValueError(f"{p}: not a published embeddings pickle ({e})") from None
    if not isinstance(obj, dict) or "paths" not in obj or "embeddings" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{p}: expected a dict with 'paths' and 'embeddings' (the published layout), got {keys}")
    paths = [str(x) for x in obj["paths"]]
    emb = obj["embeddings"]
    if isinstance(emb, (list, tuple)):  # the extraction scripts: one tensor (D,) or (1, D) per image
        rows = [
            e.detach().float().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, np.float32) for e in emb
        ]
        emb = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    elif isinstance(emb, torch.Tensor):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"{p}: embeddings must be (N, D), got shape {emb.shape}")
    if emb.shape[0] != len(paths):
        raise ValueError(f"{p}: {len(paths)} paths but {emb.shape[0]} embeddings")
    if emb.dtype != np.float32 or not emb.flags.writeable:
        emb = emb.astype(np.float32)
    return paths, emb


def import_published(
    pickles: Sequence[str | Path],
    out_dir: str | Path,
    *,
    fingerprint: str,
    trust_pickle: bool,
    expected_dim: int | None = None,
    source: str = "cc3m",
    license: str = CC3M_LICENSE,
    dtype: str = "float32",
    model: str | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert published embedding pickles (concatenated in the order given) into an index folder.

    The published vectors are already the model's retrieval embeddings (``visual_fc`` of the CLIP pooler output);
    they are L2-normalised here. ``fingerprint`` is recorded as the model they belong to: give the fingerprint of
    the model that made them (``pipeline.model.retrieval_fingerprint()`` of the published checkpoint)."""
    if not pickles:
        raise ValueError("give at least one embeddings pickle")
    out = Path(out_dir)
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; choose another --out or pass --overwrite")
    all_paths, parts = [], []
    for p in pickles:
        paths, emb = read_published_embeddings(p, trust_pickle=trust_pickle)
        if parts and emb.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{p}: {emb.shape[1]}-d embeddings, but {pickles[0]} has {parts[0].shape[1]}-d")
        all_paths.extend(paths)
        parts.append(emb)
    emb = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise ValueError(
            f"the pickle holds {emb.shape[1]}-d embeddings but the model's retrieval space is "
            f"{expected_dim}-d: it belongs to another model"
        )
    norms = np.linalg.norm(emb, axis=1)
    keep = np.isfinite(norms) & (norms > 1e-12)
    dropped = int((~keep).sum())
    if dropped:
        logger.warning("dropping %d rows whose embedding is zero or not finite", dropped)
        emb = emb[keep]
        all_paths = [q for q, k in zip(all_paths, keep, strict=True) if k]
    normalize_rows(emb)
    if dtype == "float16":
        emb = emb.astype(np.float16)

    def records() -> Iterator[dict]:
        for q in all_paths:
            yield {"url" if is_url(q) else "path": q, "source": source, "license": license}

    index = ImageIndex(emb, _LazyRecords(records, len(all_paths)), fingerprint, model=model)
    index.save(out)
    return ImportReport(out_dir=out, count=len(index), dim=index.dim, dropped=dropped)


class _LazyRecords:
    """Records produced while saving (no list of millions of dicts)."""

    def __init__(self, factory, n: int):
        self.factory, self.n = factory, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        return self.factory()

    def __getitem__(self, i: int) -> dict:
        return next(itertools.islice(self.factory(), i, None))
