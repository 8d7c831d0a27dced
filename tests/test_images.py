"""Image loading: hostile sizes refused from the header within a memory budget, and every mode reaching the model as
the RGB a viewer shows (upright, transparency over white, 16-bit scaled, first frame). Every file is made here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromage_gill.images import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_SIDE,
    ImageError,
    ImageProcessor,
    load_image,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[1]
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def _save(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: which way up it is shows."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def _with_orientation(img: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return _save(img, fmt, exif=exif, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))


# ------------------------------------------------------------------------------------------ sizes (finding A)


@pytest.mark.parametrize("size", [(20_000, 1), (1, 20_000), (1_000_000, 1), (MAX_IMAGE_SIDE + 1, 1000)])
def test_long_sides_are_refused_from_the_header(size):
    data = _save(Image.new("L", size))  # a few hundred bytes
    with pytest.raises(ImageError, match=rf"{size[0]}x{size[1]} pixels: its long side .* limit of {MAX_IMAGE_SIDE:,}"):
        load_image(data, name="thin.png")


def test_extreme_aspect_ratios_are_refused():
    with pytest.raises(ImageError, match=rf"5000x100 pixels is 50 times .* limit of {MAX_ASPECT_RATIO}:1"):
        load_image(_save(Image.new("L", (5000, 100))), name="banner.png")
    panorama = load_image(_save(Image.new("L", (100 * MAX_ASPECT_RATIO, 100))))  # at the limit: fine
    assert panorama.size == (100 * MAX_ASPECT_RATIO, 100)


def test_limits_are_arguments():
    data = _save(Image.new("L", (300, 10)))
    with pytest.raises(ImageError, match="long side"):
        load_image(data, max_side=200)
    assert load_image(data, max_aspect_ratio=30).size == (300, 10)
    with pytest.raises(ImageError, match="limit of 20:1"):
        load_image(data, max_aspect_ratio=20)


def test_the_processor_refuses_thin_images_made_in_memory():
    """Images that never went through load_image (built by a caller) cannot blow up the resize either."""
    with pytest.raises(ImageError, match="3000x10"):
        ImageProcessor(size=8)([Image.new("RGB", (3000, 10))])
    assert ImageProcessor(size=8)([Image.new("RGB", (80, 10))]).shape == (1, 3, 8, 8)


@pytest.mark.skipif(sys.platform != "linux", reason="the measurement forks and reads /proc/self/status")
def test_refusing_hostile_images_stays_within_300_mb(tmp_path):
    """Each hostile file (thin PNGs, bombs, huge headers over few bytes, truncated files, a 100,000-frame GIF) goes
    through load_image and the 224-px preprocessing in a child process; its peak memory above its baseline is
    measured there. Before the long-side limit, the 20,000 x 1 PNG wanted 4.5 GB (MemoryError under the cap)."""
    out = tmp_path / "hostile.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_hostile_images.py"),
            "--quick",
            "--headroom-mb",
            "1024",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert len(results) >= 10
    bad = [r for r in results if r["outcome"] != r["expect"] or not r["peak_mb"] < 300]
    assert not bad, proc.stdout


# ------------------------------------------------------------------------------------------ modes (finding B)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    stored = _halves()  # 40 x 20 as stored; orientation 6 means "rotate 90 degrees clockwise to view"
    img = load_image(_with_orientation(stored, 6, fmt))
    assert img.size == (20, 40)
    expected = _rgb(stored.transpose(Image.Transpose.ROTATE_270))  # red on top, blue below
    assert np.abs(_rgb(img) - expected).max() < 40  # JPEG's rounding at the seam
    assert img.getpixel((10, 5))[0] > 200 and img.getpixel((10, 35))[2] > 200


def test_exif_orientation_of_a_lazy_pil_image(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_with_orientation(_halves(), 8, "JPEG"))
    lazy = Image.open(path)  # not decoded yet
    img = load_image(lazy)
    assert img.size == (20, 40) and img.getpixel((10, 5))[2] > 200  # orientation 8: rotate 90 counter-clockwise
    assert lazy.size == (40, 20)  # the caller's image is left alone


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    data = _save(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = load_image(data)
    assert np.array_equal(_rgb(img)[..., 0], values.astype(int) >> 8)
    assert np.array_equal(_rgb(img)[..., 0], _rgb(img)[..., 2])
    wide = Image.fromarray(values.astype(np.int32) * 1, "I")  # mode I, as older Pillow opened 16-bit PNGs
    assert np.array_equal(_rgb(load_image(wide))[..., 1], values.astype(int) >> 8)


def test_palette_with_a_transparent_entry_becomes_white():
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 0])
    got = load_image(_save(img, transparency=0))  # entry 0 (black) is transparent
    assert [tuple(p) for p in _rgb(got)[0]] == [WHITE, RED, BLUE, WHITE]


@pytest.mark.parametrize(
    "mode, pixel, expected",
    [
        ("LA", (100, 0), WHITE),
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (0, 128), (127, 127, 127)),
        ("RGBA", (255, 0, 0, 0), WHITE),
        ("RGBA", (0, 0, 255, 255), BLUE),
        ("RGBA", (0, 0, 0, 64), (191, 191, 191)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), WHITE),
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
    ],
)
def test_modes_become_the_rgb_a_viewer_shows(mode, pixel, expected):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    got = load_image(_save(Image.new(mode, (3, 2), pixel), fmt))
    assert np.abs(_rgb(got) - np.array(expected)).max() <= 1, (mode, pixel, got.getpixel((0, 0)))


def test_rgb_with_a_colour_key_and_in_memory_modes():
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), BLUE)
    got = load_image(_save(img, transparency=BLUE))  # tRNS: blue is transparent
    assert [tuple(p) for p in _rgb(got)[0]] == [RED, WHITE]
    assert tuple(_rgb(to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))))[0, 0]) == WHITE  # in memory, same rule
    rgb = Image.new("RGB", (2, 2), RED)
    assert load_image(rgb) is rgb  # nothing to do: no copy


def test_animations_keep_their_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, (0, 255, 0))]
    for fmt in ("GIF", "PNG", "WEBP"):  # GIF, APNG, animated WebP
        data = _save(
            frames[0],
            fmt,
            save_all=True,
            append_images=frames[1:],
            duration=100,
            **({"lossless": True} if fmt == "WEBP" else {}),
        )
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3, fmt
        assert np.abs(_rgb(load_image(data)) - np.array(RED)).max() <= 2, fmt


def test_a_damaged_lazy_pil_image_raises_image_error(tmp_path):
    buf = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(buf[: len(buf) // 2])
    lazy = Image.open(path)  # the header is fine; the pixels are not there
    with pytest.raises(ImageError, match=r"cut.png: not a readable image \(damaged or truncated"):
        load_image(lazy)


def test_formats_outside_the_list_are_refused():
    """Pillow opens ~40 formats, some through outside programs (EPS runs Ghostscript); uploads get the usual ones."""
    for fmt in ("PPM", "TGA", "PCX"):
        data = _save(Image.new("RGB", (4, 4), RED), fmt)
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would take it
        with pytest.raises(ImageError, match="not a readable image"):
            load_image(data, name=f"x.{fmt.lower()}")
    with pytest.raises(ImageError, match="PPM is not PNG"):
        load_image(Image.open(io.BytesIO(_save(Image.new("RGB", (4, 4)), "PPM"))))  # lazy: never decoded
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        assert load_image(_save(Image.new("RGB", (4, 4), RED), fmt)).size == (4, 4), fmt
        assert load_image(Image.open(io.BytesIO(_save(Image.new("RGB", (4, 4), RED), fmt)))).size == (4, 4), fmt


def test_corrupt_exif_costs_only_the_rotation():
    data = bytearray(_with_orientation(_halves(), 6, "JPEG"))
    start = data.index(b"Exif\0\0") + 6
    data[start : start + 8] = b"XX\0\0\0\0\0\0"  # not a TIFF header any more
    img = load_image(bytes(data), name="odd.jpg")
    assert img.size in ((40, 20), (20, 40))
