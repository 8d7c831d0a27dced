"""Training throughput with precomputed frozen features vs encoding every image on the fly.

The config is tiny-fromage with a larger vision tower (ViT 128 wide, 4 layers, 64 px, patch 8: 64 patches), so
that, as with CLIP ViT-L next to a 7B LM at scale, the frozen vision encoder costs at least as much as the LM.
It reports the cost of each (vision forward per batch vs LM forward+backward per batch), then steps/s of the two
training modes on the same data, and their ratio.

    python benchmarks/bench_train.py [--steps 30] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch


def bench_config(tmp: Path) -> Path:
    cfg = json.loads((resources.files("fromage_gill") / "presets" / "tiny-fromage.json").read_text())
    cfg["name"] = "bench-fromage-big-vision"
    cfg["vision"]["config"] = {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "projection_dim": 64,
    }
    path = tmp / "bench.json"
    path.write_text(json.dumps(cfg))
    return path


def component_costs(model_cfg: Path, batch_size: int) -> tuple[float, float]:
    """Seconds per batch: frozen vision forward; LM forward + backward on [visual token; caption] (20 tokens)."""
    from fromage_gill import load_pipeline

    pipe = load_pipeline(str(model_cfg), device="cpu", dtype="fp32", weights="random")
    m = pipe.model
    s = pipe.image_processor.size
    pixels = torch.randn(batch_size, 3, s, s)
    ids = torch.randint(10, 400, (batch_size, 20))

    def vision():
        with torch.no_grad():
            m.encode_images(pixels)

    def lm():
        emb = m.embed_tokens(ids).requires_grad_()
        m.forward_lm(emb).logits.float().mean().backward()

    out = []
    for fn in (vision, lm):
        fn()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        out.append((time.perf_counter() - t) / 5)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fromage_gill import load_pipeline
    from fromage_gill.training.data import read_records
    from fromage_gill.training.loop import TrainConfig, train
    from fromage_gill.training.precompute import precompute
    from fromage_gill.training.synthetic import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = bench_config(tmp)
        data = make_shapes(tmp / "data", 20 * args.batch_size, fmt="tsv", size=96)
        vision_s, lm_s = component_costs(cfg, args.batch_size)
        print(
            f"per batch of {args.batch_size}: vision forward {vision_s * 1000:.1f} ms, "
            f"LM forward+backward {lm_s * 1000:.1f} ms (vision/LM {vision_s / lm_s:.2f})"
        )

        t = time.perf_counter()
        pipe = load_pipeline(str(cfg), device="cpu", dtype="fp32", weights="random")
        res = precompute(pipe, read_records(data), tmp / "pre", batch_size=32, progress=False)
        pre_s = time.perf_counter() - t
        print(f"precompute: {res.n_written} images in {pre_s:.1f} s (incl. model build)")

        rates = {}
        for mode in ("on-the-fly", "precomputed"):
            tc = TrainConfig(
                model=str(cfg),
                data=str(data),
                out=str(tmp / mode),
                max_steps=args.steps,
                batch_size=args.batch_size,
                warmup=0,
                val_fraction=0.0,
                save_every=10**9,
                progress=False,
                tensorboard=False,
                precomputed=str(tmp / "pre") if mode == "precomputed" else None,
            )
            r = train(tc)
            per_step = statistics.median(r.step_seconds[2:])  # the first steps warm up allocators
            rates[mode] = 1 / per_step
            print(
                f"{mode:>12}: {rates[mode]:.2f} steps/s ({per_step * 1000:.0f} ms/step, median of "
                f"{len(r.step_seconds) - 2} steps)"
            )
        print(f"speed-up with precomputed features: {rates['precomputed'] / rates['on-the-fly']:.2f}x")


if __name__ == "__main__":
    main()
