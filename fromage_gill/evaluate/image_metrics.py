"""Image-generation metrics from maintained packages: CLIP image-image cosine (a full CLIP's image tower,
``magic.clip.ClipGuide``), LPIPS and FID (torchmetrics).

torchmetrics downloads their networks on first use: LPIPS the torchvision backbone (AlexNet by default; its LPIPS
layers ship with torchmetrics), FID torch-fidelity's Inception v3. Offline (``HF_HUB_OFFLINE=1``) or when the
download fails, ``MetricUnavailable`` names the file and the folder to put it in; a task then reports the metric
as not run. ``lpips_metric(backbone="random")`` and ``fid_metric(feature=module)`` build them offline (tests: the
metric math, not the published figures).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from torchmetrics import Metric

LPIPSNet = Literal["alex", "vgg", "squeeze"]
LPIPS_WEIGHTS: dict[LPIPSNet, str] = {  # torchvision's file name for each LPIPS backbone
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
FID_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
LPIPS_SIZE = 224


class MetricUnavailable(RuntimeError):
    """A metric's network is neither on disk nor downloadable."""


def _hub_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("FROMAGE_GILL_OFFLINE") == "1"


def _unavailable(metric: str, name: str, e: Exception | None = None) -> MetricUnavailable:
    why = f" ({type(e).__name__}: {e})" if e is not None else " (offline: HF_HUB_OFFLINE is set)"
    return MetricUnavailable(
        f"{metric} needs {name}, which is not on disk and could not be downloaded{why}: put the file in "
        f"{_hub_file(name).parent} (torch.hub's cache; TORCH_HOME moves it)"
    )


def _lpips_net(backbone: str) -> LPIPSNet | None:
    """``backbone`` as the Literal torchmetrics takes, or None when it names no LPIPS backbone."""
    for net in LPIPS_WEIGHTS:
        if net == backbone:
            return net
    return None


def lpips_metric(backbone: str = "alex", *, device: torch.device | str = "cpu") -> nn.Module:
    """torchmetrics' LPIPS (inputs in [-1, 1]). ``backbone="random"``: AlexNet with random weights and the shipped
    LPIPS layers, built offline (distances are then not the published LPIPS)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    if backbone == "random":
        from torchmetrics.functional.image.lpips import _LPIPS

        return _RandomLPIPS(_LPIPS(pretrained=True, net="alex", pnet_rand=True)).to(device)
    net = _lpips_net(backbone)
    if net is None:
        raise ValueError(f"LPIPS backbone must be one of {', '.join(LPIPS_WEIGHTS)} or 'random', got {backbone!r}")
    name = LPIPS_WEIGHTS[net]
    if _offline() and not _hub_file(name).is_file():
        raise _unavailable("LPIPS", name)
    try:
        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False).to(device)
    except OSError as e:  # urllib's URLError is an OSError
        raise _unavailable("LPIPS", name, e) from e


class _RandomLPIPS(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a, b, normalize=False).flatten().mean()


def fid_metric(feature: int | nn.Module = 2048, *, device: torch.device | str = "cpu") -> Metric:
    """torchmetrics' FrechetInceptionDistance over uint8 images; ``feature`` an int picks Inception v3's layer
    (downloaded), an ``nn.Module`` (uint8 (N, 3, H, W) -> (N, F)) is used as the feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, int) and _offline() and not _hub_file(FID_WEIGHTS).is_file():
        raise _unavailable("FID", FID_WEIGHTS)
    try:
        return FrechetInceptionDistance(feature=feature, normalize=False).to(device)
    except OSError as e:
        raise _unavailable("FID", FID_WEIGHTS, e) from e
    except ModuleNotFoundError as e:
        raise MetricUnavailable(
            f"FID's Inception network needs torch-fidelity: pip install 'fromage_gill[eval]' ({e})"
        ) from e


def to_uint8(images: Sequence[Image.Image], size: int = 299) -> torch.Tensor:
    """(N, 3, size, size) uint8, each image resized (bicubic) to a square, as FID's extractor expects."""
    arrs = [np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for img in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def to_lpips_input(images: Sequence[Image.Image], size: int = LPIPS_SIZE) -> torch.Tensor:
    """(N, 3, size, size) float in [-1, 1]."""
    return to_uint8(images, size).float() / 127.5 - 1.0


@torch.no_grad()
def lpips_distances(metric: nn.Module, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> list[float]:
    """LPIPS of each pair (a[i], b[i]), lower is closer; identical images give 0."""
    device = next(metric.parameters()).device
    reset = getattr(metric, "reset", None)  # torchmetrics' LPIPS accumulates over calls; the random stand-in does not
    out = []
    for x, y in zip(a, b, strict=True):
        if callable(reset):
            reset()
        out.append(float(metric(to_lpips_input([x]).to(device), to_lpips_input([y]).to(device))))
    return out


@torch.no_grad()
def fid(metric: Metric, real: Sequence[Image.Image], fake: Sequence[Image.Image]) -> float:
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    metric.reset()
    device = metric.device if hasattr(metric, "device") else "cpu"
    metric.update(to_uint8(real).to(device), real=True)
    metric.update(to_uint8(fake).to(device), real=False)
    return float(metric.compute())


@torch.no_grad()
def clip_similarities(clip, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> list[float]:
    """Cosine of CLIP image embeddings of each pair (the GILL paper's image-image similarity)."""
    return (clip.embed_images(list(a)) * clip.embed_images(list(b))).sum(-1).tolist()
