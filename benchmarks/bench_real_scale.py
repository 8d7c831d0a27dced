"""GILL and FROMAGe at full size on a CPU, random weights: what each component costs in memory and time.

Every backbone is built from its shipped architecture (``load_pipeline(..., random_weights=True)``: OPT-6.7B,
CLIP ViT-L/14's vision tower, Stable Diffusion v1.5's UNet, VAE and text encoder), so the figures are those of the
published models without their weights. Sections (``--only`` runs some; each builds what it needs and frees it):

- ``gill``: the whole GILL stack in bf16, one component at a time (build time, parameter bytes, RSS growth and the
  peak while building); decode s/token of our KV-cached loop vs ``transformers`` ``generate`` on the same LM and
  prompt (greedy, the same tokens); then three chat turns: one that answers in text, one that retrieves from a
  random memory-mapped index of ``--index-rows`` rows, one that generates an image with 2 denoising steps at 512 px.
- ``lm-8bit`` / ``lm-4bit``: FROMAGe with its LM loaded through bitsandbytes (8-bit LLM.int8, 4-bit NF4): the
  LM's bytes against its float32 bytes, build time, peak RSS, decode s/token of a text turn and of ``generate``.
- ``lm-8bit-small``: the 8-bit prefill of our loop against ``generate``'s on an OPT-shaped LM of ``--small-width``
  x ``--small-layers`` (minutes on a CPU, not the 6.7B's hour): medians of ``--repeats`` alternating runs, and
  whether every int8 layer reads the same input in both prefills (``same_int8_inputs``).

Each loop is timed ``--repeats`` times, the order alternating (ours first, then ``generate`` first, ...), and the
medians are reported with each call's CPU seconds and major page faults: a prefill whose wall time far exceeds its
CPU time waited (for pages of the memory-mapped bf16 copy a quantized LM is reloaded from, or for the neighbours).

Times are wall-clock seconds (``perf_counter``) with the CPU seconds of the process beside them: the machine these
figures come from is shared, and CPU time shows what the work costs when the neighbours are busy.
The full GILL stack needs about 17 GB: the script refuses to start a full-size section with less than
``--min-free-gb`` available (``--force`` overrides). ``--tiny`` runs every section on the tiny presets in seconds
(what the test runs, so the script cannot rot). ``--json PATH`` writes the figures.

Usage: ``python benchmarks/bench_real_scale.py [--only gill lm-8bit lm-4bit lm-8bit-small] [--tiny] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from fromage_gill.backbones import load_diffusion, load_lm, load_tokenizer, load_vision  # noqa: E402
from fromage_gill.config import load_config  # noqa: E402
from fromage_gill.generate import Chat, GenerationSettings, ImageResult  # noqa: E402
from fromage_gill.generate import loop as generate_loop  # noqa: E402
from fromage_gill.model import GroundedLM  # noqa: E402
from fromage_gill.pipeline import Pipeline, add_image_tokens, load_pipeline  # noqa: E402

SECTIONS = ("gill", "lm-8bit", "lm-4bit", "lm-8bit-small")
warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bitsandbytes says it at every layer of every step
_sample = generate_loop.sample
GB = 1e9
PROMPT = "a photo of a small dog running on the grass next to a red ball in the park . "


class PeakRSS:
    """The process's resident memory, sampled every 20 ms by a thread: ``peak`` since the last ``reset``."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        return self.proc.memory_info().rss

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class Timer:
    wall: float = 0.0
    cpu: float = 0.0


@contextlib.contextmanager
def timed():
    t = Timer()
    w, c = time.perf_counter(), time.process_time()
    yield t
    t.wall, t.cpu = time.perf_counter() - w, time.process_time() - c


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers as they are held (a quantized layer's packed weights and scales)."""
    seen, n = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # give freed pages back to the OS, so RSS reflects what is held
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_memory(need_gb: float, force: bool, what: str) -> None:
    avail = psutil.virtual_memory().available / GB
    if avail < need_gb and not force:
        sys.exit(
            f"{what} needs about {need_gb:.0f} GB available; this machine has {avail:.1f} GB now (`free -g`). "
            f"Wait until other jobs end, run a smaller section (--only lm-4bit), or pass --force"
        )


# ------------------------------------------------------------------------------------------ measurements


def measure_build(rss: PeakRSS, name: str, build, figures: dict):
    free_memory()
    before = rss.reset()
    with timed() as t:
        obj = build()
    module = obj if isinstance(obj, torch.nn.Module) else None
    figures[name] = {
        "build_s": round(t.wall, 2),
        "build_cpu_s": round(t.cpu, 2),
        "rss_growth_gb": round((rss.now() - before) / GB, 3),
        "peak_rss_gb": round(rss.peak / GB, 3),
    }
    if module is not None:
        figures[name].update(params=n_params(module), bytes=param_bytes(module))
    print(f"  {name}: {json.dumps(figures[name])}", flush=True)
    return obj


def prompt_ids(pipe: Pipeline, n: int) -> list[int]:
    ids = pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids * (n // 8 + 1)
    return [pipe.tokenizer.bos_token_id, *ids[: n - 1]]


class StepTimes:
    """When each token of a decode was chosen: our loop's sampler and ``generate``'s logits processors are called
    once per token, so timing those calls separates the prefill (start to the first token) from the decode (first
    to last token) within one run, which a shared machine's noise cannot push below zero. The prefill's CPU
    seconds and major page faults say whether it computed or waited."""

    def __init__(self) -> None:
        self.start, self.times = 0.0, []
        self.cpu_start = self.cpu_first = 0.0
        self.faults_start = self.faults_first = 0

    def begin(self) -> None:
        self.start, self.times = time.perf_counter(), []
        self.cpu_start, self.faults_start = time.process_time(), _major_faults()

    def mark(self) -> None:
        if not self.times:
            self.cpu_first, self.faults_first = time.process_time(), _major_faults()
        self.times.append(time.perf_counter())

    def figures(self) -> dict:
        n = len(self.times)
        return {
            "prefill_s": round(self.times[0] - self.start, 3),
            "prefill_cpu_s": round(self.cpu_first - self.cpu_start, 3),
            "prefill_major_faults": self.faults_first - self.faults_start,
            "s_per_token": round((self.times[-1] - self.times[0]) / max(n - 1, 1), 4),
            "tokens": n,
        }


def _major_faults() -> int:
    """Page faults that read from disk (e.g. pages of a memory-mapped weights file the kernel had dropped)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


STEPS = StepTimes()


def _timed_sample(logits, **kw):
    tokens = _sample(logits, **kw)
    STEPS.mark()
    return tokens


class _TimedProcessor:
    def __call__(self, input_ids, scores):
        STEPS.mark()
        return scores


def ours(pipe: Pipeline, ids: list[int], n_new: int) -> list[int]:
    from fromage_gill.generate import generate_batch
    from fromage_gill.generate.prompt import TokenIds

    s = GenerationSettings(max_new_tokens=n_new, mode="text", stop_at_eos=False, stop_strings=())
    STEPS.begin()
    return generate_batch(pipe, [[TokenIds(tuple(ids[1:]))]], s)[0].tokens


def hf(pipe: Pipeline, ids: list[int], n_new: int) -> list[int]:
    from transformers import LogitsProcessorList

    lm = pipe.model.lm
    x = torch.tensor([ids], device=pipe.model.lm_device)
    STEPS.begin()
    with torch.no_grad():
        out = lm.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=True,
            pad_token_id=pipe.tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([_TimedProcessor()]),
        )
    return out[0, x.shape[1] :].tolist()


def decode_speed(pipe: Pipeline, prompt_tokens: int, new_tokens: int, repeats: int = 1) -> dict:
    """Prefill seconds and decode s/token of each loop, from the times its tokens were chosen (``StepTimes``):
    medians of ``repeats`` runs each, the order alternating so neither loop always runs first."""
    ids = prompt_ids(pipe, prompt_tokens)
    for fn in (ours, hf):  # warm-up: first calls allocate caches and pick kernels
        fn(pipe, ids, 2)
    runs: dict[str, list[dict]] = {"ours": [], "generate": []}
    tokens = {}
    loops = [("ours", ours), ("generate", hf)]
    for r in range(repeats):
        for name, fn in loops if r % 2 == 0 else loops[::-1]:
            c = time.process_time()
            tokens[name] = fn(pipe, ids, 1 + new_tokens)
            runs[name].append({**STEPS.figures(), "cpu_s": round(time.process_time() - c, 2)})
    out: dict = {}
    for name, done in runs.items():
        out[name] = {k: _median([d[k] for d in done]) for k in done[0]}
        if repeats > 1:
            out[name]["runs"] = done
    # in bf16 two loops that compute the same logits in a different order may break a near-tie differently
    out["same_tokens"] = tokens["ours"] == tokens["generate"]
    out["ratio"] = round(out["ours"]["s_per_token"] / max(out["generate"]["s_per_token"], 1e-9), 3)
    out["prefill_ratio"] = round(out["ours"]["prefill_s"] / max(out["generate"]["prefill_s"], 1e-9), 3)
    out.update(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
    print(f"  decode: {json.dumps({k: v for k, v in out.items()})}", flush=True)
    return out


def _median(values: list):
    m = statistics.median(values)
    return round(m, 4) if isinstance(m, float) else m


def same_int8_inputs(pipe: Pipeline, prompt_tokens: int) -> dict:
    """Whether every bitsandbytes int8 layer reads exactly the same input in our prefill and in ``generate``'s
    (then the two do the same int8 work, outlier columns included), and the outlier columns (|x| >= the LLM.int8
    threshold) each prefill meets."""
    import bitsandbytes as bnb

    layers = [m for m in pipe.model.lm.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "generate": []}
    current = ["ours"]
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen[current[0]].append(a[0].detach().clone())) for m in layers]
    try:
        ids = prompt_ids(pipe, prompt_tokens)
        for name, fn in (("ours", ours), ("generate", hf)):
            current[0] = name
            fn(pipe, ids, 1)  # the prefill and one token: the first len(layers) inputs are the prefill's
    finally:
        for h in hooks:
            h.remove()
    a, b = seen["ours"][: len(layers)], seen["generate"][: len(layers)]
    threshold = layers[0].state.threshold if layers else 0.0
    return {
        "int8_layers": len(layers),
        "same_int8_inputs": all(
            x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True)
        ),
        "outlier_columns": [int((x.abs() >= threshold).flatten(0, -2).any(0).sum()) for x in a],
        "threshold": threshold,
    }


def chat_turn(pipe: Pipeline, settings: GenerationSettings) -> dict:
    events = []
    with timed() as t:
        events = list(Chat(pipe).send(["Show me a photo of a dog on the grass."], settings))
    images = [e for e in events if isinstance(e, ImageResult)]
    return {
        "turn_s": round(t.wall, 2),
        "turn_cpu_s": round(t.cpu, 2),
        "images": [f"{e.source} {e.image.size[0]}x{e.image.size[1]}" for e in images if e.image is not None],
        "end": type(events[-1]).__name__ + ":" + getattr(events[-1], "reason", ""),
    }


def random_index(pipe: Pipeline, rows: int, directory: Path):
    """A memory-mapped index of ``rows`` random unit vectors in the model's retrieval space, every record the same
    small picture (the fetch is not what is measured): saved with ImageIndex.save and opened with mmap."""
    from PIL import Image

    from fromage_gill.retrieve import ImageIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, pipe.config.retrieval_dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(directory / "picture.png")
    records = [{"path": "picture.png", "url": None, "caption": f"random row {i}"} for i in range(rows)]
    fingerprint = pipe.model.retrieval_fingerprint()
    ImageIndex.from_embeddings(vectors, records, fingerprint).save(directory)
    del vectors, records
    index = ImageIndex.load(directory, expected_fingerprint=fingerprint, mmap=True)
    q = torch.randn(1, pipe.config.retrieval_dim)
    index.search(q, k=3)  # warm the page cache: the turn then measures search, not the first read from disk
    with timed() as t:
        index.search(q, k=3)
    return index, {"rows": rows, "dim": index.dim, "bytes": index.nbytes, "one_query_search_s": round(t.wall, 4)}


# ------------------------------------------------------------------------------------------ sections


def section_gill(args, rss: PeakRSS) -> dict:
    cfg = load_config(args.gill).with_random_backbones()
    cfg = dataclasses.replace(cfg, weights="random")
    dtype, device = torch.bfloat16, torch.device("cpu")
    print(f"## gill: {cfg.name}{'' if args.tiny else ' at full size'}, bf16, random weights", flush=True)
    parts: dict = {}
    tokenizer = load_tokenizer(cfg.lm)
    image_token_ids = add_image_tokens(tokenizer, cfg.image_tokens)
    # Stable Diffusion first: a random one is built in float32 and then cast, a transient the LM need not sit beside
    sd = measure_build(
        rss, "diffusion", lambda: load_diffusion(cfg.diffusion, tokenizer, dtype=dtype, device=device), parts
    )
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(sd, name)
        parts[name] = {"params": n_params(module), "bytes": param_bytes(module)}
    lm = measure_build(rss, "lm", lambda: load_lm(cfg.lm, tokenizer, dtype=dtype, device=device), parts)
    vision = measure_build(rss, "vision", lambda: load_vision(cfg.vision, dtype=dtype, device=device), parts)
    model = measure_build(
        rss,
        "trained_layers",
        lambda: GroundedLM(cfg, lm, vision, image_token_ids).trained_layers_to(device, dtype).eval(),
        parts,
    )
    parts["trained_layers"].update(
        params=sum(p.numel() for p in model.trained_parameters().values()),
        bytes=sum(p.numel() * p.element_size() for p in model.trained_parameters().values()),
    )
    pipe = Pipeline(config=cfg, model=model, tokenizer=tokenizer, diffusion=sd, device=device, dtype=dtype)
    out = {"components": parts, "stack_rss_gb": round(rss.now() / GB, 3)}

    out["decode"] = decode_speed(pipe, args.prompt_tokens, args.new_tokens, args.repeats)
    text = GenerationSettings(max_new_tokens=args.new_tokens, mode="text", seed=0)
    out["turn_text"] = chat_turn(pipe, text)
    print(f"  turn (text): {json.dumps(out['turn_text'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_real_scale_index_") as tmp:
        pipe.index, out["index"] = random_index(pipe, args.index_rows, Path(tmp))
        show = GenerationSettings(
            max_new_tokens=4, mode="retrieve", image_logit_bias=float("inf"), max_images=1, seed=0
        )
        out["turn_retrieve"] = chat_turn(pipe, show)
        print(f"  turn (retrieve, {args.index_rows:,} rows): {json.dumps(out['turn_retrieve'])}", flush=True)
        pipe.index = None
    draw = GenerationSettings(
        max_new_tokens=4, mode="generate", image_logit_bias=float("inf"), max_images=1, seed=0, num_inference_steps=2
    )
    out["turn_generate"] = chat_turn(pipe, draw)
    print(f"  turn (generate, 2 steps): {json.dumps(out['turn_generate'])}", flush=True)
    out["peak_rss_gb"] = round(rss.peak / GB, 3)
    return out  # the caller frees it all


def section_quantized(args, rss: PeakRSS, bits: str) -> dict:
    print(f"## lm-{bits}: {args.fromage} with its LM in {bits} (bitsandbytes), vision in bf16", flush=True)
    free_memory()
    rss.reset()
    with timed() as t:
        pipe = load_pipeline(
            args.fromage,
            random_weights=True,
            quantization=bits,
            dtype="bf16",
            device="cpu",
            load_diffusion_pipeline=False,
        )
    lm = pipe.model.lm
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a packed 4-bit tensor holds two weights per element: count the architecture's
        fp32 = n_params(AutoModelForCausalLM.from_config(lm.config)) * 4
    held = lm.get_memory_footprint()
    out = {
        "build_s": round(t.wall, 2),
        "build_cpu_s": round(t.cpu, 2),
        "peak_rss_build_gb": round(rss.peak / GB, 3),
        "lm_params": fp32 // 4,
        "lm_bytes": held,
        "lm_fp32_bytes": fp32,
        "fraction_of_fp32": round(held / fp32, 4),
        "rss_gb": round(rss.now() / GB, 3),
    }
    print(f"  build: {json.dumps(out)}", flush=True)
    out["decode"] = decode_speed(pipe, args.prompt_tokens, args.quant_new_tokens, args.repeats)
    out["peak_rss_gb"] = round(rss.peak / GB, 3)
    return out  # the caller frees it all


def section_small_8bit(args, rss: PeakRSS) -> dict:
    """FROMAGe on an OPT-shaped LM ``--small-width`` wide and ``--small-layers`` deep (random weights, 8-bit on the
    CPU): the full-size 8-bit section's prefill comparison in minutes."""
    width, layers = args.small_width, args.small_layers
    print(f"## lm-8bit-small: OPT-shaped LM {width} wide x {layers} layers, 8-bit (bitsandbytes), CPU", flush=True)
    lm = load_config("fromage").with_random_backbones().lm.config
    lm = {**lm, "hidden_size": width, "word_embed_proj_dim": width, "ffn_dim": 4 * width, "num_hidden_layers": layers}
    lm["num_attention_heads"] = max(1, width // 128)  # OPT-6.7B's 128-wide heads
    cfg = load_config("fromage").to_dict()
    cfg.update(
        name=f"fromage-opt-{width}x{layers}",
        lm={"source": "random", "config": lm},
        vision=load_config("tiny-fromage").to_dict()["vision"],  # the vision tower is not what is measured
        weights="random",
        weights_format="native",
        generation=None,
    )
    free_memory()
    rss.reset()
    with tempfile.TemporaryDirectory(prefix="bench_real_scale_small_") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        with timed() as t:
            pipe = load_pipeline(tmp, quantization="8bit", dtype="bf16", device="cpu", load_diffusion_pipeline=False)
    out = {
        "width": width,
        "layers": layers,
        "build_s": round(t.wall, 2),
        "lm_bytes": pipe.model.lm.get_memory_footprint(),
    }
    out.update(same_int8_inputs(pipe, args.prompt_tokens))
    print(f"  build: {json.dumps(out)}", flush=True)
    out["decode"] = decode_speed(pipe, args.prompt_tokens, args.quant_new_tokens, args.repeats)
    out["peak_rss_gb"] = round(rss.peak / GB, 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--tiny", action="store_true", help="the tiny presets: seconds, for the test")
    ap.add_argument("--index-rows", type=int, default=131_072)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--quant-new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (medians; order alternates)")
    ap.add_argument("--small-width", type=int, default=2048, help="lm-8bit-small: the LM's width")
    ap.add_argument("--small-layers", type=int, default=4, help="lm-8bit-small: the LM's layers")
    ap.add_argument("--min-free-gb", type=float, default=19.0)
    ap.add_argument("--force", action="store_true", help="start even with less memory available")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    args.gill, args.fromage = ("tiny-gill", "tiny-fromage") if args.tiny else ("gill", "fromage")
    if args.tiny:
        args.index_rows = min(args.index_rows, 2048)
        args.small_width, args.small_layers = min(args.small_width, 256), min(args.small_layers, 2)
    generate_loop.sample = _timed_sample  # this script only: the decode loop calls the sampler by this name
    rss = PeakRSS()
    result = {
        "tiny": args.tiny,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "memory_total_gb": round(psutil.virtual_memory().total / GB, 1),
    }
    print(f"# bench_real_scale: {json.dumps(result)}", flush=True)
    t0 = time.perf_counter()
    try:
        for section in args.only:
            if not args.tiny and section != "lm-8bit-small":
                need = args.min_free_gb if section == "gill" else args.min_free_gb * 0.8
                check_memory(need, args.force, f"section {section}")
            if section == "gill":
                result[section] = section_gill(args, rss)
            elif section == "lm-8bit-small":
                result[section] = section_small_8bit(args, rss)
            else:
                result[section] = section_quantized(args, rss, section[3:])
            if args.json:  # after every section: a later one that runs out of memory keeps the earlier figures
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        rss.close()
        generate_loop.sample = _sample
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
