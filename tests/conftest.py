"""Shared fixtures: tiny pipelines built offline from the shipped tiny presets (seeded random weights)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test must never reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fromage_gill import load_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fromage():
    """Shared, read-only: tests that change weights or state build their own with `make_pipeline`."""
    return load_pipeline("tiny-fromage", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_gill():
    return load_pipeline("tiny-gill", device="cpu", dtype="fp32")


@pytest.fixture
def make_pipeline():
    def make(name: str = "tiny-gill", **kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("dtype", "fp32")
        return load_pipeline(name, **kwargs)

    return make


@pytest.fixture
def images():
    """A few small distinct RGB images (PIL)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        arr = (torch.rand(48 + 8 * i, 40 + 4 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr, "RGB"))
    return out


@pytest.fixture(scope="session")
def toy_gill():
    """The shipped toy-world GILL (checkpoints/), as `python app.py --model toy-gill` loads it."""
    return load_pipeline("toy-gill", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def toy_fromage():
    return load_pipeline("toy-fromage", device="cpu", dtype="fp32")
