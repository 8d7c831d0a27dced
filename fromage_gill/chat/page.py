"""What the app's page says besides the conversation: the header (which model, what it can do) and the example
messages under the message box."""

from __future__ import annotations

from typing import Any

from ..paths import CHECKOUT_ROOT
from ..pipeline import Pipeline

ASSETS = CHECKOUT_ROOT / "assets"  # the public-domain example photos
TOY_INDEXES = CHECKOUT_ROOT / "checkpoints" / "indexes"  # the toy world's gallery and indexes, once built


def header_markdown(pipeline: Pipeline, index_names: list[str]) -> str:
    cfg = pipeline.config
    what = "GILL (retrieves and generates images)" if cfg.kind == "gill" else "FROMAGe (retrieves images)"
    lines = [f"## fromage_gill · `{cfg.name}` — {what}"]
    if cfg.is_random:
        lines.append(
            "*Offline demo model with random weights: it runs anywhere in seconds, and its answers are "
            "gibberish. Start the published model with `python app.py --model gill`.*"
        )
    elif cfg.name.startswith("toy-"):
        lines.append(
            "*Toy-world model trained on a CPU: it knows only its synthetic world of coloured shapes (six "
            "shapes, six colours, plain backgrounds). Try the examples below.*"
        )
    if cfg.kind == "gill" and pipeline.model.decision is None:
        lines.append(
            "*Running without GILL's decision head (`--no-decision-model`): every image follows the Mode "
            "setting (auto: retrieved when an index is loaded, else generated).*"
        )
    if pipeline.index is None and not index_names:
        lines.append("*No image index is loaded, so images can only be generated (pass `--index DIR`).*")
    return "\n\n".join(lines)


def example_messages(pipeline: Pipeline | None = None) -> list[dict[str, Any]]:
    """Example messages from the photos shipped in ``assets/`` (none when there are no photos); for a toy-world
    model, from its gallery of world images."""
    gallery = TOY_INDEXES / "toy-gallery" / "images"
    if pipeline is not None and pipeline.config.name.startswith("toy-") and gallery.is_dir():
        from ..toy.world import gallery_scenes  # the world alone: no training code in the app

        files = sorted(gallery.glob("*.png"))
        singles = [str(f) for f, s in zip(files, gallery_scenes(len(files)), strict=True) if len(s.things) == 1]
        wanted = [
            ("What is in this image?", singles[:1]),
            ("Show me a photo of a green triangle.", []),
            ("Draw a red circle.", []),
            # Not "What shape is this?": on this picture the toy LM runs on past "it is a ring" (measured); it was
            # trained on both questions, and describes the picture in one clean sentence.
            ("Describe the picture.", singles[1:2]),
        ]
        return [{"text": text, "files": files} for text, files in wanted if len(singles) >= 2]
    photos = {p.stem: p for p in (ASSETS / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    wanted = [
        ("What is in this picture?", ["chelsea"]),
        ("How are these two pictures different?", ["astronaut", "rocket"]),
        ("Show me another picture like this one.", ["coffee"]),
        ("Draw a picture of a cat sleeping on a red sofa.", []),
    ]
    return [
        {"text": text, "files": [str(photos[n]) for n in names]}
        for text, names in wanted
        if all(n in photos for n in names)
    ]
