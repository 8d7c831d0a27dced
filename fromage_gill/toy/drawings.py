"""A held-out set of drawings for the toy models, made by a renderer written apart from ``world.py``.

The toy world draws flat, aliased shapes on a 64x64 grid; people upload drawings of other sizes, anti-aliased,
rotated, wobbly, outlined, on paper, re-saved as JPEG. This module draws the world's 36 colour x shape pairs that
way with ``PIL.ImageDraw`` (polygons and ellipses drawn as masks at 4x the size, then downsampled), and adds images
that are not of the world at all (noise, text, stripes, checkerboards, clutter of many shapes, crops of the
photographs in ``assets/images/``). It shares only the world's words (``SHAPES``, ``COLOURS``' names) so that a
fault in the world's renderer cannot hide here. Every image is a pure function of the seed and its index
(numpy's PCG64), and ``tests/test_toy_drawings.py`` checks that the checked-in set, ``assets/drawings/``
(``DRAWINGS_DIR``), is what :func:`generate` makes. ``fromage-gill toy drawings --out DIR`` writes it again;
``fromage-gill toy eval`` measures the toy models on it.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..paths import checkout_path
from .world import COLOURS, SHAPES

logger = logging.getLogger(__name__)

SEED = 0
DRAWINGS_DIR = "repo:assets/drawings"
PHOTOS_DIR = "repo:assets/images"
LABELS = "labels.jsonl"
REPEATS = 2  # drawings of each colour x shape pair
OUT_OF_WORLD_REPEATS = 3  # rounds of OUT_OF_WORLD's images: 72, so each figure is over 60 examples or more
SUPERSAMPLE = 4  # masks are drawn this many times larger, then downsampled: anti-aliased edges

# Each colour name's range in HLS: hue in degrees and lightness (saturation is shared). The ranges stay clear of
# each other, so a drawn colour is always nearer its own name's world colour than any other's (tested): a dark
# yellow reads as orange, a dark orange as red, so those two are kept light.
RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "red": ((-8.0, 6.0), (0.40, 0.58)),
    "orange": ((25.0, 33.0), (0.47, 0.58)),
    "yellow": ((48.0, 56.0), (0.50, 0.60)),
    "green": ((105.0, 145.0), (0.35, 0.55)),
    "blue": ((212.0, 232.0), (0.40, 0.58)),
    "purple": ((272.0, 290.0), (0.40, 0.58)),
}
SATURATION = (0.7, 0.92)
OUT_OF_WORLD = (
    *("noise",) * 3,
    *("text",) * 4,
    *("stripes",) * 3,
    *("checkerboard",) * 3,
    *("clutter",) * 4,
    "scribble",
    *("photo",) * 6,
)
_TEXTS = ("hello world", "lorem ipsum", "12:45", "THE END", "see you soon", "page 3 of 7")
_PHOTOS = ("chelsea.jpg", "astronaut.jpg", "coffee.jpg", "coins.jpg", "rocket.jpg", "camera.jpg")

Kind = Literal["drawing", "out_of_world"]


@dataclass(frozen=True)
class Example:
    """One image of the set: its file, what it shows (colour and shape for a drawing) and how it was made."""

    file: str
    kind: Kind
    colour: str | None = None
    shape: str | None = None
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "drawing" and (self.colour not in COLOURS or self.shape not in SHAPES):
            raise ValueError(f"a drawing needs a colour in {tuple(COLOURS)} and a shape in {SHAPES}: {self}")
        if self.kind not in ("drawing", "out_of_world"):
            raise ValueError(f"kind must be 'drawing' or 'out_of_world', got {self.kind!r}")


# ------------------------------------------------------------------------------------------------ colours


def sample_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """An RGB shade of the colour ``name``, from its hue / lightness / saturation range."""
    hues, lightness = RANGES[name]
    h, light, sat = rng.uniform(*hues) % 360.0, rng.uniform(*lightness), rng.uniform(*SATURATION)
    r, g, b = colorsys.hls_to_rgb(h / 360.0, light, sat)
    return round(r * 255), round(g * 255), round(b * 255)


def _background(w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, object]]:
    """Flat off-white / grey / dark, paper (off-white with grain and blotches) or a light gradient; (h, w, 3)."""
    kind = str(rng.choice(["off_white", "grey", "dark", "paper", "gradient"], p=[0.3, 0.15, 0.15, 0.2, 0.2]))
    base = {"off_white": (236, 252), "grey": (170, 215), "dark": (15, 60), "paper": (225, 245)}
    if kind == "gradient":
        a, b = rng.uniform(200, 250, 3), rng.uniform(200, 250, 3)
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        t = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0, 1)[..., None]
        img = a * (1 - t) + b * t
    else:
        lo, hi = base[kind]
        img = np.broadcast_to(rng.uniform(lo, hi) + rng.uniform(-4, 4, 3), (h, w, 3)).astype(np.float64)
    if kind == "paper":  # grain, and blotches: coarse noise blown up
        coarse = Image.fromarray(rng.uniform(0, 255, (max(2, h // 24), max(2, w // 24))).astype(np.uint8), "L")
        blotch = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64) / 255 - 0.5
        img = img + 10 * blotch[..., None] + rng.normal(0, 3, (h, w, 1))
    return img, {"background": kind}


# ------------------------------------------------------------------------------------------------ shapes


def outline_points(shape: str, rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """The shape's closed outlines in units of its radius (x right, y down), before rotation; a ring has two."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "circle":
        return [circle * [1.0, rng.uniform(0.88, 1.0)]], 0.0
    if shape == "ring":
        inner = rng.uniform(0.5, 0.72)
        return [circle, circle * inner], inner
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.85], 0.0
    if shape == "diamond":
        return [np.array([[0, -1], [1, 0], [0, 1], [-1, 0]]) * [rng.uniform(0.8, 1.0), 1.0]], 0.0
    if shape == "triangle":
        return [np.array([[0, -1], [0.9, 0.7], [-0.9, 0.7]])], 0.0
    if shape == "cross":
        a = rng.uniform(0.25, 0.38)
        quarter = [[a, -1], [a, -a], [1, -a]]
        pts = []
        for k in range(4):  # the same arm turned by 90 degrees four times
            c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
            pts += [[x * c - y * s, x * s + y * c] for x, y in quarter]
        return [np.array(pts, dtype=np.float64)], a
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _wobble(points: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """A hand's wobble: each edge cut into short segments whose ends move by about ``amount`` radii, smoothly (the
    jitter is averaged with its neighbours' along the outline, so a line bends rather than zigzags)."""
    if amount == 0:
        return points
    closed = np.concatenate([points, points[:1]])
    steps = max(1, 48 // len(points))
    dense = np.concatenate(
        [a + (b - a) * k / steps for a, b in zip(closed[:-1], closed[1:], strict=True) for k in range(steps)]
    ).reshape(-1, 2)
    jitter = rng.normal(0, 2 * amount, dense.shape)
    return dense + sum(np.roll(jitter, k, axis=0) for k in (-2, -1, 0, 1, 2)) / 5


# Rotation in degrees around each shape's upright pose; a square turned by 45 would be a diamond and a cross an x.
_ROTATION = {"circle": 180, "ring": 180, "square": 18, "diamond": 18, "triangle": 25, "cross": 18}


def draw(colour: str, shape: str, rng: np.random.Generator) -> tuple[Image.Image, dict[str, object]]:
    """One drawing of a ``colour`` ``shape`` and the parameters it was drawn with."""
    long_side = round(math.exp(rng.uniform(math.log(48), math.log(400))))
    aspect = rng.uniform(0.6, 1.7)  # width / height
    w, h = (
        (long_side, max(32, round(long_side / aspect)))
        if aspect >= 1
        else (max(32, round(long_side * aspect)), long_side)
    )
    bg, params = _background(w, h, rng)
    radius = rng.uniform(0.18, 0.42) * min(w, h)
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    rotation = rng.uniform(-_ROTATION[shape], _ROTATION[shape])
    style = str(rng.choice(["filled", "outlined", "filled_outlined"], p=[0.45, 0.25, 0.3]))
    wobble = float(rng.choice([0.0, rng.uniform(0.01, 0.05)]))
    width = rng.uniform(0.06, 0.14) * radius  # outline width in pixels of the final image
    fill = sample_colour(colour, rng)
    outlines, detail = outline_points(shape, rng)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    turn = np.array([[c, s], [-s, c]])
    polys = [[tuple(p) for p in ((_wobble(o, wobble, rng) @ turn) * radius + [cx, cy]) * SUPERSAMPLE] for o in outlines]
    big = (w * SUPERSAMPLE, h * SUPERSAMPLE)
    inside, edge = Image.new("L", big, 0), Image.new("L", big, 0)
    ImageDraw.Draw(inside).polygon(polys[0], fill=255)
    for hole in polys[1:]:  # the ring's inner circle
        ImageDraw.Draw(inside).polygon(hole, fill=0)
    for poly in polys:
        ImageDraw.Draw(edge).line([*poly, poly[0]], fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")
    img = bg
    dark = np.array(rng.uniform(10, 50) + rng.uniform(-5, 5, 3))
    layers = {"filled": [(inside, fill)], "outlined": [(edge, fill)], "filled_outlined": [(inside, fill), (edge, dark)]}
    for mask, rgb in layers[style]:
        alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
        img = img * (1 - alpha) + np.asarray(rgb, dtype=np.float64) * alpha
    params.update(
        width=w, height=h, radius=radius, centre=[cx, cy], rotation=rotation, style=style, wobble=wobble, fill=fill
    )
    if shape in ("ring", "cross"):
        params["detail"] = detail  # the ring's inner radius, the cross's arm width
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), params


# ------------------------------------------------------------------------------------------------ not of the world


def not_a_shape(kind: str, index: int, rng: np.random.Generator) -> tuple[Image.Image, dict[str, object]]:
    """An image the toy world has no words for: ``kind`` one of ``OUT_OF_WORLD``'s."""
    side = int(rng.integers(64, 257))
    w, h = side, int(rng.integers(48, 257))
    params: dict[str, object] = {"width": w, "height": h}
    if kind == "noise":
        cells = int(rng.choice([1, 4, 16]))  # pixel noise, or blocks of it
        small = rng.uniform(0, 255, (max(1, h // cells), max(1, w // cells), 3))
        img = Image.fromarray(small.astype(np.uint8), "RGB").resize((w, h), Image.Resampling.NEAREST)
        params["cells"] = cells
    elif kind == "text":
        text = _TEXTS[index % len(_TEXTS)]
        font = ImageFont.load_default_imagefont()  # a bitmap font: the same pixels everywhere
        small = Image.new("L", (6 * len(text) + 8, 20), 0)
        ImageDraw.Draw(small).text((4, 4), text, fill=255, font=font)
        scale = max(1, w // small.width)
        mask = small.resize((small.width * scale, small.height * scale), Image.Resampling.BICUBIC)
        img = Image.new("RGB", mask.size, tuple(int(v) for v in rng.integers(220, 256, 3)))
        img.paste(tuple(int(v) for v in rng.integers(0, 80, 3)), mask=mask)
        params.update(text=text, width=img.width, height=img.height)
    elif kind in ("stripes", "checkerboard"):
        a, b = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        period = int(rng.integers(6, 24))
        y, x = np.mgrid[0:h, 0:w]
        on = (x // period) % 2 == 0 if kind == "stripes" else ((x // period) + (y // period)) % 2 == 0
        img = Image.fromarray(np.where(on[..., None], a, b).astype(np.uint8), "RGB")
        img = img.rotate(float(rng.uniform(-40, 40)), resample=Image.Resampling.BICUBIC, fillcolor=b)
        params.update(period=period)
    elif kind == "clutter":
        img = Image.fromarray(np.clip(np.rint(_background(w, h, rng)[0]), 0, 255).astype(np.uint8), "RGB")
        count = int(rng.integers(10, 25))
        for _ in range(count):
            piece, _ = draw(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), rng)
            piece.thumbnail((max(8, w // 4), max(8, h // 4)))
            img.paste(piece, (int(rng.integers(0, w - piece.width + 1)), int(rng.integers(0, h - piece.height + 1))))
        params["shapes"] = count
    elif kind == "scribble":
        img = Image.new("RGB", (w, h), (245, 243, 238))
        pts = np.cumsum(rng.normal(0, side / 10, (40, 2)), 0) + [w / 2, h / 2]
        ImageDraw.Draw(img).line([tuple(p) for p in pts], fill=(30, 30, 90), width=3, joint="curve")
        img = img.filter(ImageFilter.SMOOTH)
    elif kind == "photo":
        name = _PHOTOS[index % len(_PHOTOS)]
        with Image.open(checkout_path(f"{PHOTOS_DIR}/{name}")) as f:
            photo = f.convert("RGB")
        cw, ch = int(photo.width * rng.uniform(0.5, 1.0)), int(photo.height * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((x0, y0, x0 + cw, y0 + ch))
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        params.update(photo=name, width=img.width, height=img.height)
    else:
        raise ValueError(f"unknown out-of-world kind {kind!r}; one of {sorted(set(OUT_OF_WORLD))}")
    params["content"] = kind
    return img, params


# ------------------------------------------------------------------------------------------------ the set


def _rounded(value: object) -> object:
    if isinstance(value, float | np.floating):
        return round(float(value), 3)
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def generate(seed: int = SEED) -> list[tuple[Example, Image.Image]]:
    """The whole set: ``REPEATS`` drawings of each colour x shape pair, then the out-of-world images. Each image
    from its own generator (``[seed, index]``), so changing one kind of image leaves the others as they were.
    Some are re-encoded as JPEG (their ``jpeg_quality``), all paper ones: photographed paper is a JPEG."""
    out: list[tuple[Example, Image.Image]] = []
    pairs = [(c, s) for _ in range(REPEATS) for c in COLOURS for s in SHAPES]
    for i, (colour, shape) in enumerate(pairs):
        rng = np.random.default_rng([seed, i])
        img, params = draw(colour, shape, rng)
        quality = int(rng.integers(30, 92)) if params["background"] == "paper" or rng.random() < 0.3 else None
        params["jpeg_quality"] = quality
        name = f"d{i:03d}_{colour}_{shape}.{'jpg' if quality else 'png'}"
        out.append((Example(name, "drawing", colour, shape, {k: _rounded(v) for k, v in params.items()}), img))
    for j, kind in enumerate(OUT_OF_WORLD * OUT_OF_WORLD_REPEATS):
        rng = np.random.default_rng([seed, len(pairs) + j])
        img, params = not_a_shape(kind, j, rng)
        quality = int(rng.integers(60, 92)) if kind in ("noise", "photo", "clutter") else None  # keeps them small
        params["jpeg_quality"] = quality
        name = f"o{j:03d}_{kind}.{'jpg' if quality else 'png'}"
        out.append((Example(name, "out_of_world", params={k: _rounded(v) for k, v in params.items()}), img))
    return out


def write(out_dir: str | Path, seed: int = SEED) -> list[Example]:
    """Write the set's images and ``labels.jsonl`` to ``out_dir`` (made if missing); returns its examples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for ex, img in generate(seed):
        quality = ex.params["jpeg_quality"]
        if isinstance(quality, int):
            img.save(out / ex.file, format="JPEG", quality=quality)
        else:
            img.save(out / ex.file, format="PNG", optimize=True)
        examples.append(ex)
    with open(out / LABELS, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(ex), sort_keys=True) + "\n" for ex in examples)
    logger.info("wrote %d images and %s to %s", len(examples), LABELS, out)
    return examples


def load(directory: str | Path = DRAWINGS_DIR) -> list[Example]:
    """The examples ``labels.jsonl`` in ``directory`` lists (a ``repo:`` path or a folder)."""
    labels = Path(checkout_path(str(directory))) / LABELS
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found: write the set with `fromage-gill toy drawings --out DIR`")
    examples = []
    with open(labels, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected an object, got {type(row).__name__}")
                examples.append(Example(**row))
                if not (labels.parent / examples[-1].file).is_file():
                    raise ValueError(f"its image {examples[-1].file!r} is missing")
            except (ValueError, TypeError) as e:  # json's errors are ValueErrors; unknown or missing keys TypeErrors
                raise ValueError(
                    f"{labels}:{i}: not a drawings-set label ({e}); write the set again with "
                    f"`fromage-gill toy drawings --out DIR`"
                ) from None
    return examples


def open_image(directory: str | Path, example: Example) -> Image.Image:
    with Image.open(Path(checkout_path(str(directory))) / example.file) as f:
        return f.convert("RGB")
