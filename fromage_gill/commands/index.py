"""``fromage-gill index build|import|info|search|faiss``: make, inspect and query retrieval indexes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_model_args, load_from_args

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("index", help="build, import, inspect and search image retrieval indexes")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    _register_build(sub)
    _register_import(sub)
    _register_info(sub)
    _register_search(sub)
    _register_faiss(sub)


def _register_build(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("build", help="embed a folder / list / tar shards of images into an index")
    add_model_args(b)
    b.add_argument(
        "--images",
        required=True,
        help="a folder (recursive), a .txt/.csv/.tsv list of paths or URLs (CC3M caption<TAB>url too), "
        "or .tar shards (img2dataset / webdataset; brace patterns like 'dir/{00000..00009}.tar')",
    )
    b.add_argument("--out", required=True, help="the index folder to write")
    b.add_argument("--image-root", help="folder that relative paths in a list are relative to (default: the list's)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--workers", type=int, default=4, help="threads reading / fetching images")
    b.add_argument(
        "--storage-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="float16 halves the size; scores change by ~1e-3",
    )
    b.add_argument("--no-resume", action="store_true", help="start over instead of resuming an interrupted build")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument(
        "--absolute-paths",
        action="store_true",
        help="record absolute image paths (default: relative to --out, so index and images move together)",
    )
    b.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let URLs reach loopback (127.0.0.0/8, ::1) and the private ranges 10.0.0.0/8, 172.16.0.0/12, "
        "192.168.0.0/16 and fc00::/7 (an intranet image server); nothing else: link-local, 0.0.0.0/8, CGNAT and "
        "cloud metadata addresses stay refused",
    )
    b.add_argument(
        "--allow-link-local-urls",
        action="store_true",
        help="let URLs reach link-local addresses, 169.254.0.0/16 and fe80::/10 (a device on the local link); "
        "the cloud metadata addresses in that range (169.254.169.254, 169.254.170.2) stay refused",
    )
    b.add_argument("--faiss", choices=["flat", "ivf", "hnsw"], help="also build a FAISS index beside the vectors")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_build)


def _register_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("import", help="convert the published cc3m_embeddings pickles into an index")
    i.add_argument(
        "pickles",
        nargs="+",
        metavar="PICKLE",
        help="cc3m_embeddings*.pkl (FROMAGe) or cc3m_embeddings_urls.npy (GILL; a pickle despite the name)",
    )
    i.add_argument("--out", required=True)
    i.add_argument(
        "--trust-pickle",
        action="store_true",
        help="required: pickles can run code when loaded; pass it only for files from a trusted source",
    )
    who = i.add_mutually_exclusive_group(required=True)
    who.add_argument("--fingerprint", help="the retrieval fingerprint of the model the embeddings belong to")
    who.add_argument(
        "--model",
        help="the model they belong to (preset, directory or repo): its fingerprint is "
        "computed from its trained layers (the LM itself is not loaded)",
    )
    i.add_argument("--weights", help="trained layers of --model to use instead of its own")
    i.add_argument("--source", default="cc3m", help="source field of every record (default: cc3m)")
    i.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=_import)


def _register_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    n = sub.add_parser("info", help="count, dimensions, model fingerprint and size of an index")
    n.add_argument("dir")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    n.set_defaults(func=_info)


def _register_search(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("search", help="top-k images of an index for a text (or an image)")
    s.add_argument("dir")
    add_model_args(s)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a caption: embedded at the model's [RET] / [IMG0] token")
    q.add_argument("--image", help="an image path: embedded like the index's images (nearest duplicates)")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--method", choices=["auto", "exact", "faiss"], default="auto")
    s.set_defaults(func=_search)


def _register_faiss(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser("faiss", help="build (or replace) the FAISS index of an index folder")
    f.add_argument("dir")
    f.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="hnsw")
    f.add_argument("--nlist", type=int, help="IVF lists (default 4*sqrt(N))")
    f.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")
    f.add_argument("--hnsw-m", type=int, default=32)
    f.add_argument("--ef-search", type=int, default=128)
    f.set_defaults(func=_faiss)


def _build(args: argparse.Namespace) -> int:
    from ..retrieve import FetchConfig, ImageIndex, build_index

    pipeline = load_from_args(args, load_diffusion_pipeline=False)
    report = build_index(
        pipeline,
        args.images,
        args.out,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        progress=not args.no_progress,
        image_root=args.image_root,
        dtype=args.storage_dtype,
        fetch_config=FetchConfig(allow_private=args.allow_private_urls, allow_link_local=args.allow_link_local_urls),
        relative_paths=not args.absolute_paths,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    if args.faiss:
        index = ImageIndex.load(args.out, use_faiss=False)
        index.build_faiss(args.faiss)
        index.save(args.out)
    print(
        f"{report.out_dir}: {report.count} images indexed, {len(report.skipped)} skipped "
        f"({report.rate:.1f} images/s this run)"
    )
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..retrieve import import_published

    fingerprint, dim, model = args.fingerprint, None, None
    if args.model:
        from ..pipeline import load_pipeline

        # the fingerprint only needs the trained layers: the frozen LM and vision encoder stay skeletons
        pipeline = load_pipeline(args.model, device="cpu", dtype="fp32", weights=args.weights, skeleton=True)
        fingerprint, dim, model = (
            pipeline.model.retrieval_fingerprint(),
            pipeline.config.retrieval_dim,
            pipeline.config.name,
        )
    report = import_published(
        args.pickles,
        args.out,
        fingerprint=fingerprint,
        trust_pickle=args.trust_pickle,
        expected_dim=dim,
        source=args.source,
        dtype=args.storage_dtype,
        model=model,
        overwrite=args.overwrite,
    )
    print(
        f"{report.out_dir}: {report.count:,} images x {report.dim} imported (fingerprint {fingerprint})"
        + (f", {report.dropped} zero rows dropped" if report.dropped else "")
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..retrieve import ImageIndex

    index = ImageIndex.load(args.dir, use_faiss=False)
    d = Path(args.dir)
    size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    meta = json.loads((d / "index.json").read_text())
    info = {
        "dir": str(d),
        "count": len(index),
        "dim": index.dim,
        "dtype": index.dtype,
        "model": index.model,
        "fingerprint": index.fingerprint,
        "bytes": size,
        "faiss": meta.get("faiss"),
        "created": meta.get("created"),
        "source": meta.get("source"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{d}: {len(index):,} images x {index.dim} ({index.dtype}), {size / 2**20:.1f} MiB on disk")
    print(f"  model: {index.model}  fingerprint: {index.fingerprint}")
    print(f"  faiss: {meta['faiss']['kind'] if meta.get('faiss') else 'none (exact search)'}")
    if meta.get("source"):
        print(f"  built from: {meta['source']}")
    return 0


def _search(args: argparse.Namespace) -> int:
    import torch

    from ..images import load_image
    from ..retrieve import ImageIndex

    pipeline = load_from_args(args, load_diffusion_pipeline=False)
    model = pipeline.model
    index = ImageIndex.load(args.dir, expected_fingerprint=model.retrieval_fingerprint())
    with torch.no_grad():
        if args.image:
            query = model.image_embedding(model.encode_images(pipeline.image_processor([load_image(args.image)])))
        else:
            query = text_query(pipeline, args.text)
    result = index.search(query, args.k, method=args.method)
    for rank, (i, score) in enumerate(zip(result.ids[0], result.scores[0], strict=True), 1):
        if i < 0:
            break
        rec = index.record(int(i))
        where = rec.get("url") or rec.get("path")
        caption = f"  {rec['caption']!r}" if rec.get("caption") else ""
        print(f"{rank:>3}. {score:.4f}  #{i}  {where}{caption}")
    sys.stdout.flush()
    return 0


def text_query(pipeline: Pipeline, text: str):
    """(1, D) text embedding of ``text`` followed by the model's image tokens, read at the first of them
    ([RET] for FROMAGe, [IMG0] for GILL), as the model emits them when it retrieves."""
    import torch

    model, tok = pipeline.model, pipeline.tokenizer
    ids = tok(text, return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.tensor([model.image_token_ids])], dim=1)
    out = model.forward_lm(model.embed_tokens(ids), logits="none")
    return model.text_embedding(out.hidden[:, ids.shape[1] - len(model.image_token_ids)])


def _faiss(args: argparse.Namespace) -> int:
    from ..retrieve import ImageIndex

    index = ImageIndex.load(args.dir, use_faiss=False)
    kw = {"nprobe": args.nprobe, "hnsw_m": args.hnsw_m, "ef_search": args.ef_search}
    if args.nlist:
        kw["nlist"] = args.nlist
    index.build_faiss(args.kind, **kw)
    index.save(args.dir)
    print(f"{args.dir}: FAISS {args.kind} index over {len(index):,} images written beside the vectors")
    return 0
