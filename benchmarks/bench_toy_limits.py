"""What bounds the toy models' captioning and retrieval figures, measured on the shipped checkpoints in one run:

1. the frozen small CLIP alone: complete caption -> image R@1/5/10 over the shipped 300-image gallery, with the
   captions `fromage-gill toy eval` queries the toy models with (CLIP's text tower against its image tower);
2. how much of a one-shape image's shape the frozen image features hold (CLIP's pooled output, what the visual
   tokens read): a linear probe and a one-hidden-layer MLP probe trained on training-split images, accuracy on the
   held-out one-shape images the captioning measure uses (more of them), overall and by size;
3. the shape judge of the generation measure (the small CLIP's zero-shot pick among the six shapes) on real
   held-out one-shape images and on their round trip through the toy VAE: the most a generated image can score
   (and, for comparison, the same CLIP with bare "a circle", "a square" ... prompts);
4. each toy model's R@1 on as many training-split scenes as the gallery holds, next to the held-out gallery's:
   whether the retrieval layers under-fit (both low) or over-fit (training high).

    python benchmarks/bench_toy_limits.py [--probe-train 4000] [--probe-test 600] [--sheet drawings.png]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fromage_gill.paths import checkout_path
from fromage_gill.pipeline import load_pipeline
from fromage_gill.toy import evaluate as E
from fromage_gill.toy import world as W

CLIP_DIR = checkout_path("repo:checkpoints/toy/clip")


def clip_alone(pipe, scenes: list[W.Scene]) -> dict[str, float]:
    """Complete caption -> image with the toy CLIP's own two towers (cosine similarity, as it was trained)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(CLIP_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(CLIP_DIR)
    complete, *_ = E.retrieval_queries(scenes)
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer(complete, padding=True, return_tensors="pt"))
        image = clip.get_image_features(pixel_values=pipe.model.vision.processor([s.render() for s in scenes]))
    text, image = (getattr(x, "pooler_output", x) for x in (text, image))  # a tensor or an output, by version
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    ranks = (text @ image.T).argsort(dim=1, descending=True)
    hit = ranks == torch.arange(len(scenes))[:, None]
    return {f"R@{k}": round(float(hit[:, :k].any(1).float().mean()), 3) for k in (1, 5, 10)}


def features(pipe, scenes: list[W.Scene], batch: int = 100) -> torch.Tensor:
    m = pipe.model
    with torch.no_grad():
        return torch.cat(
            [
                m.encode_images(m.vision.processor([s.render() for s in scenes[i : i + batch]])).float()
                for i in range(0, len(scenes), batch)
            ]
        )


def shape_probe(pipe, n_train: int, n_test: int, steps: int = 3000) -> dict[str, dict[str, float]]:
    """Held-out shape accuracy of probes on the frozen image features (standardised on the training images)."""
    train = W.scenes(n_train, split="train", seed=123, two=False)
    test = E.held_out_singles(n_test)
    shapes = sorted({s.things[0].shape for s in train})
    y_train = torch.tensor([shapes.index(s.things[0].shape) for s in train])
    y_test = torch.tensor([shapes.index(s.things[0].shape) for s in test])
    x_train, x_test = features(pipe, train), features(pipe, test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    small = torch.tensor([s.things[0].size == "small" for s in test])
    out = {}
    for name, hidden in (("linear", 0), ("mlp", 256)):
        torch.manual_seed(0)
        d = x_train.shape[1]
        net = (
            nn.Linear(d, len(shapes))
            if not hidden
            else nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, len(shapes)))
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(len(x_train), (256,))
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = net(x_test).argmax(1) == y_test
        out[name] = {
            part: round(float(right[mask].float().mean()), 3)
            for part, mask in (("all", torch.ones_like(small)), ("small", small), ("large", ~small))
        }
    return out


def judge_ceiling(n: int) -> dict[str, dict[str, float]]:
    """The generation measure's shape judge on real held-out one-shape images and on their VAE round trip, and
    for comparison a judge with bare "a circle", "a square" ... prompts on the real images."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPModel

    from fromage_gill.toy.pretrain import _to_pil, clip_embed_images, clip_embed_texts, vae_pixels

    scenes = E.held_out_singles(n)
    real = [s.render() for s in scenes]
    vae = AutoencoderKL.from_pretrained(checkout_path("repo:checkpoints/toy/diffusion/vae")).eval()
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in real])).permute(0, 3, 1, 2)
    with torch.no_grad():
        round_trip = _to_pil(vae.decode(vae.encode(vae_pixels(pixels)).latent_dist.mode()).sample)
        clip = CLIPModel.from_pretrained(CLIP_DIR).eval()
        bare = clip_embed_texts(clip, AutoTokenizer.from_pretrained(CLIP_DIR), [f"a {s}" for s in W.SHAPES])
        bare_pick = [W.SHAPES[p] for p in (clip_embed_images(clip, pixels) @ bare.T).argmax(1).tolist()]
    small = torch.tensor([s.things[0].size == "small" for s in scenes])
    out = {}
    for name, picks in (
        ("real", E.shape_judge(CLIP_DIR, real, scenes)),
        ("vae_round_trip", E.shape_judge(CLIP_DIR, round_trip, scenes)),
        ("real_bare_prompts", bare_pick),
    ):
        right = torch.tensor([p == s.things[0].shape for p, s in zip(picks, scenes, strict=True)])
        out[name] = {
            part: round(float(right[mask].float().mean()), 3)
            for part, mask in (("all", torch.ones_like(small)), ("small", small), ("large", ~small))
        }
    return out


def drawing_sheet(path: str, n: int = 24, columns: int = 6, cell: int = 128) -> dict[str, float]:
    """toy-gill's drawings for the first ``n`` requests of the generation measure (25 DDIM steps, guidance 4, as
    `fromage-gill toy eval`), each with its request and the judge's pick, saved as one PNG to look at."""
    from PIL import Image, ImageDraw

    pipe = load_pipeline("toy-gill", device="cpu", dtype="fp32")
    targets, ours, _ = E.drawings(pipe, n, steps=25, guidance=4.0)
    picks = E.shape_judge(CLIP_DIR, ours, targets)
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (scene, image, pick) in enumerate(zip(targets, ours, picks, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + 30)
        sheet.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        thing = scene.things[0]
        draw.text((x + 3, y + cell + 2), f"{thing.size} {thing.colour} {thing.shape}", fill="black")
        colour_ok = W.dominant_colour(image) == thing.colour
        draw.text(
            (x + 3, y + cell + 15),
            f"judge: {W.dominant_colour(image)} {pick}",
            fill="darkgreen" if colour_ok and pick == thing.shape else "firebrick",
        )
    sheet.save(path)
    both = [
        W.dominant_colour(im) == s.things[0].colour and p == s.things[0].shape
        for s, im, p in zip(targets, ours, picks, strict=True)
    ]
    return {"drawings": n, "colour_and_shape_judged_right": round(sum(both) / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe-train", type=int, default=4000)
    ap.add_argument("--probe-test", type=int, default=600)
    ap.add_argument("--gallery", type=int, default=300)
    ap.add_argument("--sheet", help="also save toy-gill's drawings for 24 held-out requests here (PNG)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    gallery = W.gallery_scenes(args.gallery)
    seen = W.distinct_scenes(args.gallery, split="train", seed=5)  # as many training-split scenes
    result: dict = {"gallery": len(gallery), "chance_R@1": round(1 / len(gallery), 4)}
    for name in ("toy-fromage", "toy-gill"):
        pipe = load_pipeline(name, device="cpu", dtype="fp32", load_diffusion_pipeline=False)
        result[name] = {"held_out": E.retrieval(pipe, gallery), "training_scenes": E.retrieval(pipe, seen)}
    result["clip_alone"] = clip_alone(pipe, gallery)
    result["shape_probe"] = {
        "train_images": args.probe_train,
        "test_images": args.probe_test,
        **shape_probe(pipe, args.probe_train, args.probe_test),
    }
    result["shape_judge"] = {"images": args.probe_test, **judge_ceiling(args.probe_test)}
    print(
        f"frozen CLIP alone, complete caption -> image over {len(gallery)}: "
        + " ".join(f"{k} {v:.3f}" for k, v in result["clip_alone"].items())
    )
    for name in ("toy-fromage", "toy-gill"):
        r = result[name]
        print(f"{name}: R@1 held-out {r['held_out']['R@1']:.3f}, training scenes {r['training_scenes']['R@1']:.3f}")
    for name in ("linear", "mlp"):
        p = result["shape_probe"][name]
        print(
            f"shape from the frozen image features, {name} probe: {p['all']:.3f} "
            f"(small {p['small']:.3f}, large {p['large']:.3f})"
        )
    for name in ("real", "vae_round_trip", "real_bare_prompts"):
        p = result["shape_judge"][name]
        label = {
            "real": "real images",
            "vae_round_trip": "VAE round trips",
            "real_bare_prompts": "real images, bare 'a circle' prompts",
        }[name]
        print(f"generation's shape judge on {label}: {p['all']:.3f} (small {p['small']:.3f}, large {p['large']:.3f})")
    if args.sheet:
        result["sheet"] = drawing_sheet(args.sheet)
        print(
            f"drawings sheet: {args.sheet} ({result['sheet']['colour_and_shape_judged_right']:.3f} of "
            f"{result['sheet']['drawings']} judged right in colour and shape)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
