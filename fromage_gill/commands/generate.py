"""``fromage-gill generate``: one turn of dialogue from the command line, streamed, images written to files."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..generate.events import Event, ImagePending, ImageResult, Notice, TextDelta, TurnEnd
from ..generate.history import JSON
from ..images import load_image
from ..settings import GenerationSettings
from .common import add_model_args, load_from_args

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..retrieve import ImageIndex

logger = logging.getLogger(__name__)
DEFAULT_OUT = "fromage-gill-images"  # a folder of its own: never files dropped among the user's


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def run(args: argparse.Namespace) -> int:
    from ..generate import Chat

    given = _given_settings(args)  # everything the user typed is checked before the model loads
    images = [load_image(Path(path)) for path in args.image]
    if args.index is not None and not Path(args.index).is_dir():
        raise FileNotFoundError(f"--index {args.index}: no such directory")

    pipeline = load_from_args(args, load_diffusion_pipeline=args.mode in (None, "auto", "generate"))
    settings = GenerationSettings.for_model(pipeline.config, **given)
    pipeline.index = _load_index(args.index, pipeline)
    answer = _Answer(Path(args.out), echo=not args.json)
    for event in Chat(pipeline).send([*images, args.text], settings):
        answer.add(event)
    end = answer.end
    if args.json:
        doc = {
            "model": pipeline.config.name,
            "segments": answer.segments,
            "notices": answer.notices,
            "reason": end.reason if end else None,
            "seed": end.seed if end else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write("\n")
        logger.info("stopped: %s (seed %s)", end.reason if end else "?", end.seed if end else "?")
    return 0


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:  # Any: the options' values, checked here
    """The settings the user set (unset options take the model's defaults), checked: a bad value fails here,
    naming its option, before the model loads."""
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
    GenerationSettings(**given)
    return given


class _Answer:
    """The answer as it streams: echoed to the terminal (``echo``), its images written to ``out_dir``, and kept as
    the JSON document's segments (an image as the history saves one: its decision ``{p_generate, p_retrieve}``)."""

    def __init__(self, out_dir: Path, *, echo: bool):
        self.out_dir, self.echo = out_dir, echo
        self.segments: list[JSON] = []
        self.notices: list[str] = []
        self.end: TurnEnd | None = None

    def add(self, event: Event) -> None:
        match event:
            case TextDelta(text=text):
                if self.segments and self.segments[-1]["type"] == "text":
                    self.segments[-1]["text"] += text
                else:
                    self.segments.append({"type": "text", "text": text})
                self._say(text)
            case ImagePending(slot=slot) if self.echo:
                print(f"\n[image {slot + 1}: resolving...]", file=sys.stderr, flush=True)
            case ImageResult():
                self._image(event)
            case Notice(text=text):
                self.notices.append(text)
                if self.echo:
                    print(f"note: {text}", file=sys.stderr, flush=True)
            case TurnEnd():
                self.end = event
            case _:  # a generated image's progress: the terminal shows the image once it is there
                pass

    def _image(self, image: ImageResult) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"answer-image{image.slot + 1}.png"
        image.image.save(path)
        self.segments.append(
            {
                "type": "image",
                "source": image.source,
                "path": str(path),
                "score": image.score,
                "decision": image.decision.to_json() if image.decision else None,
                "caption": image.caption,
                "url": image.url,
                "index_id": image.index_id,
                "seed": image.seed,
            }
        )
        score = f" ({image.score:.2f})" if image.score is not None else ""
        self._say(f"\n[{image.source}{score}: {path}]\n")

    def _say(self, text: str) -> None:
        if self.echo:
            sys.stdout.write(text)
            sys.stdout.flush()


def _load_index(directory: str | None, pipeline: Pipeline) -> ImageIndex | None:
    from ..retrieve import ImageIndex, shipped_index_dir

    fingerprint = pipeline.model.retrieval_fingerprint()
    if directory is not None:
        return ImageIndex.load(directory, expected_fingerprint=fingerprint)
    shipped = shipped_index_dir(pipeline.config.name)
    if shipped is None:
        return None
    logger.info("retrieving from the shipped index %s", shipped)
    return ImageIndex.load(shipped, expected_fingerprint=fingerprint)
