"""Retrieval: the image index a model retrieves from, and the images behind it.

    from fromage_gill.retrieve import ImageIndex, shipped_index_dir
    index = ImageIndex.load(shipped_index_dir("tiny-fromage"), expected_fingerprint=model.retrieval_fingerprint())
    result = index.search(queries, k=5)               # SearchResult: ids, cosine scores (Q, k)
    found = index.fetch_first(result.ids[0].tolist())  # (id, PIL image) of the first that loads

- ``storage.py``: the folder format (safetensors vectors, JSONL records, ``index.json``), written and read;
- ``index.py``: ``ImageIndex``: search (exact or through a FAISS index), records, the fetcher of result images;
- ``exact.py``: ``exact_search``, the one-pass top-k kernels (FAISS's flat kernel, numpy, torch), ties by id;
- ``build.py``: ``build_index``, a resumable build from images through the model;
- ``published.py``: ``import_published``, the authors' CC3M embedding pickles (restricted unpickling);
- ``fetch.py``: ``ImageFetcher``, bounded fetching of paths, tar members and URLs (timeouts, size and address limits);
- ``sources.py``: ``iter_image_caption_items``, the readers of image sets (folders, lists, TSV/CSV, tar shards).
docs/index.md describes them.
"""

from .build import BuildReport, build_index
from .fetch import FetchConfig, FetchError, ImageFetcher
from .index import ImageIndex, SearchResult, shipped_index_dir
from .published import ImportReport, UntrustedPickleError, import_published, read_published_embeddings
from .sources import ImageItem, iter_image_caption_items, read_item_bytes
from .storage import BrokenIndexError, FingerprintMismatchError

__all__ = [
    "BrokenIndexError",
    "BuildReport",
    "FetchConfig",
    "FetchError",
    "FingerprintMismatchError",
    "ImageFetcher",
    "ImageIndex",
    "ImageItem",
    "ImportReport",
    "SearchResult",
    "UntrustedPickleError",
    "build_index",
    "import_published",
    "iter_image_caption_items",
    "read_item_bytes",
    "read_published_embeddings",
    "shipped_index_dir",
]
