"""A small generated image-caption set (coloured shapes) for tests, demos and benchmarks: no download needed.

Each image is one shape of one colour at a random place and size on a dark, slightly noisy background; its caption
names both ("a red circle"). Written in any of the layouts ``data.read_records`` understands.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 50, 200),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")


def shape_image(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    bg = tuple(rng.randint(0, 40) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    s = rng.randint(size // 3, size * 3 // 4)
    x, y = rng.randint(0, size - s), rng.randint(0, size - s)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle((x, y, x + s, y + s), fill=fill)
    elif shape == "circle":
        draw.ellipse((x, y, x + s, y + s), fill=fill)
    else:
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def make_shapes(
    root: str | Path, n: int, *, fmt: Literal["tsv", "csv", "folder", "tar"] = "tsv", size: int = 32, seed: int = 0
) -> Path:
    """Write ``n`` examples under ``root``; returns what to pass as ``--data``. Examples cycle through every
    (colour, shape) pair, so any ``len(COLOURS) * len(SHAPES)`` consecutive ones hold each pair once."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    examples = []
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        examples.append((f"{i:05d}", f"a {colour} {shape}", shape_image(colour, shape, rng, size)))
    if fmt in ("tsv", "csv"):
        (root / "images").mkdir(exist_ok=True)
        sep = "\t" if fmt == "tsv" else ","
        lines = [f"caption{sep}image"]
        for key, caption, img in examples:
            img.save(root / "images" / f"{key}.png")
            lines.append(f"{caption}{sep}images/{key}.png")
        path = root / f"captions.{fmt}"
        path.write_text("\n".join(lines) + "\n")
        return path
    if fmt == "folder":
        for key, caption, img in examples:
            img.save(root / f"{key}.png")
            (root / f"{key}.txt").write_text(caption + "\n")
        return root
    if fmt == "tar":
        path = root / "shard-00000.tar"
        with tarfile.open(path, "w") as tf:
            for key, caption, img in examples:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return path
    raise ValueError(f"fmt must be tsv, csv, folder or tar, got {fmt!r}")
