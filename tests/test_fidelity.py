"""Fidelity to the published code: each test reproduces a documented behaviour of the authors' FROMAGe, GILL or
MAGIC code (docs/fidelity.md lists them), computed here from the reference's rule, not from the project's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fromage_gill.images import CLIP_MEAN, CLIP_STD, ImageProcessor

SIZES = [(640, 480), (480, 640), (500, 375), (427, 640), (640, 427), (160, 120), (120, 160), (300, 200), (224, 224)]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    # Noise: a crop off by one pixel, or one grey level of resampling, shows as a large difference
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _clip_reference(size: int = 224):
    """transformers' PIL-backed CLIP processor with CLIP ViT-L/14's settings, built offline (what the published
    code's CLIPFeatureExtractor was; transformers 5 names it CLIPImageProcessorPil)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# ------------------------------------------------------------------------------ image preprocessing


@pytest.mark.parametrize("w,h", SIZES)
def test_pixels_equal_clips_image_processor(w, h):
    img = _noise(w, h)
    ref = _clip_reference()(images=[img], return_tensors="pt")["pixel_values"]
    ours = ImageProcessor()([img])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_the_long_side_is_truncated():
    # 160x120 -> 298.67 x 224: CLIP makes it 298 wide (the crop starts at column 37); rounding made it 299 (col 37
    # of 299 is another pixel). The crop of a 298-wide bicubic resize is what the processor must give.
    img = _noise(160, 120, seed=3)
    resized = img.resize((298, 224), Image.BICUBIC).crop((37, 0, 37 + 224, 224))
    x = np.asarray(resized, dtype=np.float32) / 255.0
    want = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    ours = ImageProcessor()([img])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - want).max() <= 1e-6


def test_transformers_torchvision_processor_differs_only_by_resampling():
    """transformers 5's default CLIPImageProcessor resizes with torchvision, not PIL: same geometry (a shifted crop
    would differ by > 1 in normalised units on noise), at most two grey levels apart."""
    from transformers import CLIPImageProcessor

    tv = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    for w, h in SIZES:
        img = _noise(w, h)
        diff = (tv(images=[img], return_tensors="pt")["pixel_values"] - ImageProcessor()([img])).abs().max().item()
        assert diff <= 2.5 / 255 / min(CLIP_STD), (w, h, diff)


def test_squash_resizes_the_whole_image_as_the_demos_did():
    img = _noise(640, 480, seed=1)
    want = ImageProcessor()([img.resize((224, 224), Image.BICUBIC)])  # the demo's upload, then CLIP (a no-op crop)
    assert (ImageProcessor(resize="squash")([img]) - want).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="resize='stretch'.*'crop'.*'squash'"):
        ImageProcessor(resize="stretch")


def test_magic_clip_uses_the_same_processing():
    from fromage_gill.config import load_config
    from fromage_gill.magic.clip import load_clip

    guide = load_clip(load_config("tiny-magic").clip, device="cpu", dtype=torch.float32)
    size = guide.processor.size
    img = _noise(640, 480, seed=2)
    ref = _clip_reference(size)(images=[img], return_tensors="pt")["pixel_values"]
    assert (guide.processor([img]) - ref).abs().max().item() <= 1e-6
