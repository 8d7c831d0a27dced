"""Reading and preprocessing images: safe decoding (size, pixel, long-side and aspect limits, checked from the header
before any pixel is decoded), the right RGB for every mode, and CLIP's 224-px preprocessing.

Every image that reaches a model goes through ``load_image``: chat uploads, API messages, index builds, training
data, imported conversations, fetched URLs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # a photograph is a few MB; anything bigger is a mistake or an attack
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: bigger images are refused (decompression bombs)
# The pixel limit alone lets a 143-byte 20000 x 1 PNG through, and resizing its short side to 224 px makes a 4.5-
# gigapixel image on the way to the centre crop. Preprocessing costs about size^2 * (long side / short side), so the
# aspect ratio bounds it; the long side bounds the decoded rows of thin images that are still under the ratio.
MAX_IMAGE_SIDE = 16_384  # a 64-megapixel panorama of 16384 x 3906 still fits
MAX_ASPECT_RATIO = 32  # long side / short side: wide banners (10:1) and panoramas (up to ~20:1) fit

# Pillow can open ~40 formats; some hand the file to outside programs (EPS runs Ghostscript) or to rarely used
# decoders. These are what cameras, phones, browsers and datasets produce.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An input that is not a usable image; the message names the input and the problem."""


def load_image(
    source: str | Path | bytes | Image.Image,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
    name: str | None = None,
    max_side: int = MAX_IMAGE_SIDE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode an image from a path, bytes or a PIL image into upright RGB, refusing empty, corrupt and oversized input.

    Sizes are checked from the header, before the pixels are decoded. Only the first frame of an animation is kept;
    EXIF orientation is applied; transparency is composited over white; 16-bit greyscale is scaled to 8 bits. A PIL
    image may be lazy (straight from ``Image.open``): it is decoded here, and a damaged one raises ``ImageError``.
    """
    limits = (max_pixels, max_side, max_aspect_ratio)
    if isinstance(source, Image.Image):
        name = name or str(getattr(source, "filename", "") or "image")
        if getattr(source, "tile", None) and source.format not in _formats():  # lazy: its decoder has not run yet
            raise ImageError(
                f"{name}: not a readable image ({source.format} is not PNG, JPEG, GIF, WebP, BMP, TIFF or AVIF)"
            )
        _check_size(source, name, *limits)
        return _decoded(source, name, owned=False)
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{name}: {size} bytes is more than the {max_bytes}-byte limit for an image")
        data = path.read_bytes()
    else:
        data, name = bytes(source), name or "image"
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes is more than the {max_bytes}-byte limit for an image")
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError:  # PIL refuses > 2x its own limit while reading the header, before we look
        raise ImageError(f"{name}: more pixels than the limit of {max_pixels:,} pixels; resize it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (not PNG, JPEG, GIF, WebP, BMP, TIFF or AVIF)") from None
    except (OSError, SyntaxError, ValueError) as e:  # a known format whose header is damaged
        raise ImageError(f"{name}: not a readable image (damaged or truncated: {e})") from None
    _check_size(img, name, *limits)  # from the header, before decoding the pixels
    return _decoded(img, name, owned=True)


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; AVIF is there only where Pillow was built with libavif
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _check_size(img: Image.Image, name: str, max_pixels: int, max_side: int, max_aspect_ratio: float) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} pixels is more than the limit of {max_pixels:,} pixels; resize it first")
    if max(w, h) > max_side:
        raise ImageError(
            f"{name}: {w}x{h} pixels: its long side ({max(w, h):,} pixels) is more than the limit of "
            f"{max_side:,} pixels; resize it first"
        )
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise ImageError(
            f"{name}: {w}x{h} pixels is {max(w, h) / min(w, h):,.0f} times longer than it is wide, more "
            f"than the limit of {max_aspect_ratio:g}:1; crop it first"
        )


def _decoded(img: Image.Image, name: str, *, owned: bool) -> Image.Image:
    """``img`` decoded (first frame), upright and RGB; ``owned``: ``img`` is ours to change in place."""
    try:
        img.load()  # the first frame only: an animation's other frames are never decoded
        orientation = _orientation(img, name)
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img, in_place=owned) or img  # in place: no second copy of a big image
        return to_rgb(img)
    except Image.DecompressionBombError:  # a later part of the file (e.g. a frame) asks for more than the header
        raise ImageError(f"{name}: more pixels than the pixel limit; resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:  # a known format whose data is damaged, e.g. a truncated JPEG
        raise ImageError(f"{name}: not a readable image (damaged or truncated: {e})") from None


def _orientation(img: Image.Image, name: str) -> int | None:
    try:
        return img.getexif().get(ExifTags.Base.Orientation)
    except Exception as e:  # noqa: BLE001 -- a damaged EXIF block must not cost the picture, only its rotation
        logger.warning("%s: EXIF data unreadable (%s); orientation not applied", name, e)
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, as a viewer would show it (``img`` itself when it already is).

    Transparency (RGBA, LA, PA, a palette or colour key with a transparent entry) is composited over white, as
    transformers' ``convert_to_rgb`` does (Pillow alone would keep the hidden colour under each transparent pixel,
    often black); 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) keep their top 8 bits (Pillow alone clips
    every value above 255 to white); palette, greyscale, CMYK and the rest convert with Pillow."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # (H, W) values in [0, 65535], as 16-bit PNG and TIFF decode; the top byte, as Pillow reads 16-bit RGB
        transparency = img.info.get("transparency")
        values = np.asarray(img)  # (H, W) uint16, or int32 for mode I
        if values.dtype.kind == "i":
            values = np.clip(values, 0, 65535)
        grey = Image.fromarray((values >> 8).astype(np.uint8), "L")
        if isinstance(transparency, int):  # a 16-bit colour key
            alpha = Image.fromarray(np.where(np.asarray(img) == transparency, 0, 255).astype(np.uint8), "L")
            grey.putalpha(alpha)
        img = grey
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # convert() to the same mode would copy
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # the alpha band is the mask
        return out
    return img.convert("RGB")


def image_hash(img: Image.Image) -> str:
    """Content hash of the decoded pixels: the key of the vision-feature cache."""
    h = hashlib.sha256()
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing: resize the short side to ``size`` (bicubic), centre-crop, scale to [0, 1], normalise.

    The pixels equal transformers' PIL-backed CLIP image processor's (``CLIPImageProcessorPil``; before
    transformers 5, ``CLIPImageProcessor`` itself), which the published code used: the long side is scaled to
    ``int(size * long / short)``, truncated. ``resize="squash"``: resize the whole image to ``size`` x ``size``
    instead, as the published demos did to every upload (nothing is cropped; the picture is distorted).
    """

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: Literal["crop", "squash"] = "crop"

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "squash"):
            raise ValueError(
                f"ImageProcessor.resize={self.resize!r}: must be 'crop' (CLIP's short side + centre crop) or "
                f"'squash' (the whole image to size x size, as the published demos)"
            )

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._one(img) for img in images])  # (N, 3, size, size)

    def _one(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        w, h = img.size
        # Resizing the short side to `size` first makes a (size * ratio) x size image: bounded only by the ratio.
        # load_image refuses such images already; this keeps images made in memory (or built by hand) bounded too.
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise ImageError(f"a {w}x{h}-pixel image is more than {MAX_ASPECT_RATIO}:1; crop it before preprocessing")
        if self.resize == "squash":
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            # Truncated, and computed in this order, as CLIP's processor does: rounding instead makes a 640x480
            # photo 299 px wide where CLIP's is 298, and moves every pixel of the crop.
            long = int(self.size * max(w, h) / min(w, h))
            img = img.resize((self.size, long) if w <= h else (long, self.size), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
