"""``fromage-gill generate``: one turn of dialogue from the command line, streamed, images written to files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .common import add_model_args, load_from_args

logger = logging.getLogger(__name__)
DEFAULT_OUT = "fromage-gill-images"  # a folder of its own: never files dropped among the user's


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="answer a message (text and images) with streamed text and inline images",
        description="Send one message (the --image files, then --text, wrapped in the model's dialogue template) "
        "and print the answer as it streams. Images the model retrieves or generates are written to "
        "--out. With --json, one JSON document of the answer's segments is printed at the end.",
    )
    add_model_args(p)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an input image (repeatable; images come before the text, in the order given)",
    )
    p.add_argument("--text", required=True, help="the message")
    p.add_argument(
        "--mode",
        choices=["auto", "retrieve", "generate", "text"],
        help="auto (default): the model decides (GILL's decision head); text: no images",
    )
    p.add_argument("--seed", type=int, help="makes sampling and generated images reproducible")
    # Unset options take the model's defaults (its preset's "generation"), else GenerationSettings' own.
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="decoding steps; an image's tokens count as one, as the demos' 'words' (default 64; 32 for the "
        "published presets, as their demos)",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="when sampling (default 1.0; 0.95 for the published presets)")
    p.add_argument("--top-k", type=int, help="default 0 (off)")
    p.add_argument("--max-images", type=int, help="images per answer at most (default 2; 1 for gill, as its demo)")
    p.add_argument(
        "--ret-scale-factor",
        type=float,
        help="the published scaling of the [RET]/[IMG0] logit (default 1.0; 1.3 for gill, as its demo)",
    )
    p.add_argument("--gen-scale-factor", type=float, help="GILL's scaling of [IMG0] for generation (default 1.0)")
    p.add_argument("--min-word-tokens", type=int, help="no image before this many tokens of the answer (default 0)")
    p.add_argument(
        "--answer-style",
        choices=["full", "published"],
        help="full (default): every word up to a stop; published: cut as the authors' code (first newline, "
        "then first full stop; no text after the last image); see docs/fidelity.md",
    )
    p.add_argument(
        "--image-logit-bias",
        type=float,
        help="added to the image token's logit: > 0 makes images likelier (default 0, or the model's)",
    )
    p.add_argument("--steps", type=int, help="Stable Diffusion denoising steps (default 50)")
    p.add_argument("--guidance-scale", type=float, help="default 7.5")
    p.add_argument(
        "--index",
        metavar="DIR",
        help="image index to retrieve from (default: the shipped index of a tiny preset, if any)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder the answer's images are written to, created when needed; each image's path is printed "
        f"(default: ./{DEFAULT_OUT})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of streaming text")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generate import Chat, GenerationSettings, ImagePending, ImageResult, Notice, TextDelta, TurnEnd
    from ..images import load_image

    # Everything the user typed is checked before the model loads.
    given = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        mode=args.mode,
        image_logit_bias=args.image_logit_bias,
        max_images=args.max_images,
        ret_scale_factor=args.ret_scale_factor,
        gen_scale_factor=args.gen_scale_factor,
        min_word_tokens=args.min_word_tokens,
        answer_style=args.answer_style,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    given = {k: v for k, v in given.items() if v is not None}
    GenerationSettings(**given)  # a bad value fails here, naming its option

    images = [load_image(Path(path)) for path in args.image]
    if args.index is not None and not Path(args.index).is_dir():
        raise FileNotFoundError(f"--index {args.index}: no such directory")
    out_dir = Path(args.out)

    pipeline = load_from_args(args, load_diffusion_pipeline=args.mode in (None, "auto", "generate"))
    settings = GenerationSettings.for_model(pipeline.config, **given)
    pipeline.index = _load_index(args.index, pipeline)
    chat = Chat(pipeline)
    segments: list[dict] = []
    notices: list[str] = []
    end = None
    stream = sys.stdout
    for ev in chat.send([*images, args.text], settings):
        if isinstance(ev, TextDelta):
            if segments and segments[-1]["type"] == "text":
                segments[-1]["text"] += ev.text
            else:
                segments.append({"type": "text", "text": ev.text})
            if not args.json:
                stream.write(ev.text)
                stream.flush()
        elif isinstance(ev, ImagePending) and not args.json:
            print(f"\n[image {ev.slot + 1}: resolving...]", file=sys.stderr, flush=True)
        elif isinstance(ev, ImageResult):
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"answer-image{ev.slot + 1}.png"
            ev.image.save(path)
            seg = {
                "type": "image",
                "source": ev.source,
                "path": str(path),
                "score": ev.score,
                "decision": None
                if ev.decision is None
                else {"p_generate": ev.decision[0], "p_retrieve": ev.decision[1]},
                "caption": ev.caption,
                "url": ev.url,
                "index_id": ev.index_id,
                "seed": ev.seed,
            }
            segments.append(seg)
            if not args.json:
                score = f" ({ev.score:.2f})" if ev.score is not None else ""
                stream.write(f"\n[{ev.source}{score}: {path}]\n")
                stream.flush()
        elif isinstance(ev, Notice):
            notices.append(ev.text)
            if not args.json:
                print(f"note: {ev.text}", file=sys.stderr, flush=True)
        elif isinstance(ev, TurnEnd):
            end = ev
    if args.json:
        doc = {
            "model": pipeline.config.name,
            "segments": segments,
            "notices": notices,
            "reason": end.reason if end else None,
            "seed": end.seed if end else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        stream.write("\n")
        logger.info("stopped: %s (seed %s)", end.reason if end else "?", end.seed if end else "?")
    return 0


def _load_index(directory: str | None, pipeline):
    from ..retrieve import ImageIndex, shipped_index_dir

    fingerprint = pipeline.model.retrieval_fingerprint()
    if directory is not None:
        return ImageIndex.load(directory, expected_fingerprint=fingerprint)
    shipped = shipped_index_dir(pipeline.config.name)
    if shipped is None:
        return None
    logger.info("retrieving from the shipped index %s", shipped)
    return ImageIndex.load(shipped, expected_fingerprint=fingerprint)
