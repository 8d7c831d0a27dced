"""GILL at full size on one CUDA GPU, random weights, no network: what a Space host needs to know.

For each configuration (``bf16``: everything in bf16; ``lm-8bit`` / ``lm-4bit``: the LM through bitsandbytes, the
rest in fp16), built with ``load_pipeline("gill", random_weights=True)`` from the shipped architectures:

- peak GPU memory after loading and after the turns (``torch.cuda.max_memory_allocated``), and the build time;
- decode ms/token of our KV-cached loop vs ``transformers`` ``generate`` on the same LM and prompt (greedy);
- time to first token at turn 1 and at turn 10 of one conversation (the prefix cache reused);
- one Stable Diffusion image at 512 px with 50 denoising steps (guidance 7.5), the published setting;
- with ``--serving``: ``bench_serving.py``'s sweep at full size (bf16 GILL behind the OpenAI-compatible API in this
  process: 1, 4, 8, 16 clients x 5 turns of 32 text tokens, a 20-turn chat's first token, the attachment abuse).

Sized to finish in under 8 minutes on one large GPU: ``--only`` picks configurations, ``--new-tokens`` and
``--steps`` shorten it. ``--dry-run`` prints the plan and builds nothing; ``--tiny`` runs the same code on tiny-gill
on the CPU in seconds (what the test runs, so the script cannot rot). ``--json PATH`` writes the figures.

Usage: ``python benchmarks/gpu_check.py [--only bf16 lm-8bit lm-4bit] [--json gpu.json] [--dry-run] [--tiny]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIGS = {  # name -> (quantization, dtype of everything that is not a quantized LM)
    "bf16": (None, "bf16"),
    "lm-8bit": ("8bit", "fp16"),
    "lm-4bit": ("4bit", "fp16"),
}
PROMPT = "a photo of a small dog running on the grass next to a red ball in the park . "


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def clock(device: torch.device, out: list):
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def ours(pipe, ids: list[int], n_new: int) -> list[int]:
    from fromage_gill.generate import GenerationSettings, generate_batch
    from fromage_gill.generate.prompt import TokenIds

    s = GenerationSettings(max_new_tokens=n_new, mode="text", stop_at_eos=False, stop_strings=())
    return generate_batch(pipe, [[TokenIds(tuple(ids[1:]))]], s)[0].tokens


def hf(pipe, ids: list[int], n_new: int) -> list[int]:
    x = torch.tensor([ids], device=pipe.model.lm_device)
    with torch.no_grad():
        out = pipe.model.lm.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=True,
            pad_token_id=pipe.tokenizer.pad_token_id,
        )
    return out[0, x.shape[1] :].tolist()


def decode(pipe, device: torch.device, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """ms/token = (time of 1 + n tokens - time of 1 token) / n, medians of ``repeats`` interleaved runs."""
    ids = pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids * (prompt_tokens // 8 + 1)
    ids = [pipe.tokenizer.bos_token_id, *ids[: prompt_tokens - 1]]
    for fn in (ours, hf):  # warm-up: kernels chosen, caches allocated
        fn(pipe, ids, 2)
    times: dict = {(f, n): [] for f in ("ours", "generate") for n in (1, new_tokens + 1)}
    tokens = {}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("generate", hf)):
            for n in (1, new_tokens + 1):
                with clock(device, times[name, n]):
                    tokens[name] = fn(pipe, ids, n)
    out = {
        name: round(
            (statistics.median(times[name, new_tokens + 1]) - statistics.median(times[name, 1])) / new_tokens * 1e3, 3
        )
        for name in ("ours", "generate")
    }
    return {
        "ms_per_token": out,
        "ratio": round(out["ours"] / max(out["generate"], 1e-9), 3),
        "same_tokens": tokens["ours"] == tokens["generate"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }


def first_tokens(pipe, device: torch.device, turns: int = 10) -> dict:
    """Time to the first token of turns 1 and ``turns`` of one conversation (32-token answers)."""
    from fromage_gill.generate import Chat, GenerationSettings
    from fromage_gill.generate import loop as generate_loop

    chosen: list[float] = []
    sample = generate_loop.sample

    def timed_sample(logits, **kw):
        tokens = sample(logits, **kw)
        sync(device)
        chosen.append(time.perf_counter())
        return tokens

    s = GenerationSettings(max_new_tokens=32, mode="text", stop_at_eos=False, stop_strings=(), seed=0)
    chat, firsts = Chat(pipe), []
    generate_loop.sample = timed_sample
    try:
        for i in range(turns):
            chosen.clear()
            sync(device)
            t = time.perf_counter()
            for _ in chat.send([f"question {i}: what is in the picture of the dog and the ball?"], s):
                pass
            firsts.append(chosen[0] - t)
    finally:
        generate_loop.sample = sample
    return {"turn_1_ms": round(firsts[0] * 1e3, 1), f"turn_{turns}_ms": round(firsts[-1] * 1e3, 1)}


def diffusion(pipe, device: torch.device, steps: int) -> dict:
    from fromage_gill.generate import Chat, GenerationSettings, ImageResult

    s = GenerationSettings(
        max_new_tokens=4,
        mode="generate",
        image_logit_bias=float("inf"),
        max_images=1,
        seed=0,
        num_inference_steps=steps,
    )
    times: list[float] = []
    with clock(device, times):
        images = [e for e in Chat(pipe).send(["Draw a dog on the grass."], s) if isinstance(e, ImageResult)]
    size = images[0].image.size if images and images[0].image is not None else None
    return {"steps": steps, "turn_s": round(times[0], 2), "image": f"{size[0]}x{size[1]}" if size else None}


def run_config(name: str, args, device: torch.device) -> dict:
    from fromage_gill.pipeline import load_pipeline

    quantization, dtype = CONFIGS[name]
    if device.type == "cpu":  # --tiny: bitsandbytes' CPU path, and fp32 where fp16 has no CPU kernels
        dtype = "fp32" if quantization is None else "bf16"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    built: list[float] = []
    with clock(device, built):
        pipe = load_pipeline(args.model, random_weights=True, device=device, dtype=dtype, quantization=quantization)
    out = {
        "quantization": quantization,
        "dtype": dtype,
        "build_s": round(built[0], 1),
        "peak_gb_loaded": peak_gb(device),
    }
    print(f"  {name} loaded: {json.dumps(out)}", flush=True)
    out["decode"] = decode(pipe, device, args.prompt_tokens, args.new_tokens, args.repeats)
    print(f"  {name} decode: {json.dumps(out['decode'])}", flush=True)
    out["first_token"] = first_tokens(pipe, device, args.turns)
    print(f"  {name} first token: {json.dumps(out['first_token'])}", flush=True)
    out["diffusion"] = diffusion(pipe, device, args.steps)
    out["peak_gb"] = peak_gb(device)
    print(f"  {name} diffusion: {json.dumps(out['diffusion'])}; peak {out['peak_gb']} GiB", flush=True)
    del pipe
    gc.collect()
    return out


def serving(args, device: torch.device) -> dict:
    """bench_serving's sweep against this GPU: the model behind ``fromage-gill api``'s app, on 127.0.0.1 in a thread
    (RSS is this process's, so it includes the clients). ``--tiny``: a few turns, for the test."""
    import socket
    import sys
    import threading

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_serving

    from fromage_gill.pipeline import load_pipeline
    from fromage_gill.serve.api import build_app
    from fromage_gill.serve.backend import ThreadedChatBackend

    dtype = "fp32" if device.type == "cpu" else "bf16"
    pipe = load_pipeline(args.model, random_weights=True, device=device, dtype=dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(build_app(ThreadedChatBackend(pipe, max_queue=64)), port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    if args.tiny:
        flags = [
            "--clients",
            "1",
            "2",
            "--turns",
            "1",
            "--long-turns",
            "2",
            "--abuse-clients",
            "1",
            "--abuse-images",
            "1",
        ]
        flags += ["--abuse-side", "256", "--max-tokens", "2"]
    else:
        flags = ["--max-tokens", "32"]
    # one run of each point: the full-size sweep is sized to the lent GPU's minutes (the CPU figures take 5)
    bench = bench_serving.parser().parse_args([*flags, "--mode", "text", "--repeats", "1"])
    rss = bench_serving.RSS(os.getpid())
    try:
        return bench_serving.run_all(f"http://127.0.0.1:{port}/v1", pipe.config.name, bench, rss)
    finally:
        rss.stop()
        server.should_exit = True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (published: 50)")
    ap.add_argument("--turns", type=int, default=10, help="the chat turn whose first token is timed against turn 1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-gill on the CPU: seconds, for the test")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, build nothing")
    ap.add_argument("--serving", action="store_true", help="also bench_serving's sweep at full size (bf16)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.model = "tiny-gill" if args.tiny else "gill"
    device = torch.device("cpu" if args.tiny else args.device)
    plan = {
        "model": args.model,
        "device": str(device),
        "configs": {n: dict(zip(("quantization", "dtype"), CONFIGS[n], strict=True)) for n in args.only},
        "decode": f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}",
        "first_token": f"turns 1 and {args.turns} of one chat, 32-token answers",
        "diffusion": f"one 512 px image, {args.steps} steps, guidance 7.5",
    }
    if args.serving:
        plan["serving"] = "1, 4, 8, 16 clients x 5 turns of 32 tokens over HTTP; a 20-turn chat; 8 x 8 8000-px PNGs"
    print(f"# gpu_check: {json.dumps(plan)}", flush=True)
    if args.dry_run:
        return {"plan": plan}
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs on the CPU")
    result = {"plan": plan, "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    t0 = time.perf_counter()
    for name in args.only:
        result[name] = run_config(name, args, device)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.serving:
        result["serving"] = serving(args, device)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"(total {result['total_s']} s)")
    return result


if __name__ == "__main__":
    main()
