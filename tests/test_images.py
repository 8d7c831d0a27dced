"""Image loading: hostile sizes refused from the header within a memory budget. Every file is made here."""

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
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_hostile_images.py"), "--quick",
                           "--headroom-mb", "1024", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert len(results) >= 10
    bad = [r for r in results if r["outcome"] != r["expect"] or not r["peak_mb"] < 300]
    assert not bad, proc.stdout
