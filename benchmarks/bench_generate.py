"""Generation engine speed on a CPU-sized model (random weights), in one run:

1. decode ms/token of our KV-cached loop vs ``transformers`` ``generate(use_cache=True)`` on the same LM, same
   prompt, same (greedy) tokens;
2. our loop vs the reference-style loop that runs the LM over the whole sequence at every step (the published
   code), at 64, 256 and 1024 prompt tokens and 64 new tokens;
3. time to first token at turn 10 of a chat vs turn 1 (prefix-cache reuse), and turn 10 with a cold cache;
4. UNet calls in a turn that retrieves (tiny-gill, shipped or in-memory index) vs one that generates.

Every figure is the median of ``--repeats`` runs. Times are the process's CPU time with one torch thread by
default: the machine these figures come from is shared with other jobs, and CPU time measures what the code costs
rather than how busy the neighbours are (``--wall`` measures wall-clock time instead, ``--threads`` sets threads).

Usage: ``python benchmarks/bench_generate.py [--repeats 5] [--wall] [--threads 1]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fromage_gill.config import LMSpec, load_config  # noqa: E402
from fromage_gill.generate import (  # noqa: E402
    Chat,
    GenerationSettings,
    ImageResult,
    generate_batch,
)
from fromage_gill.generate import loop as generate_loop  # noqa: E402
from fromage_gill.generate.prompt import TokenIds  # noqa: E402
from fromage_gill.generate.sampling import sample  # noqa: E402
from fromage_gill.pipeline import build_pipeline, load_pipeline  # noqa: E402

LM = {
    "model_type": "opt",
    "vocab_size": 512,
    "hidden_size": 256,
    "word_embed_proj_dim": 256,
    "num_hidden_layers": 4,
    "ffn_dim": 1024,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "layerdrop": 0.0,
}
NEW = 64
clock = time.process_time  # see the module docstring; main() switches to perf_counter with --wall


def bench_pipeline():
    base = load_config("tiny-fromage")
    cfg = dataclasses.replace(base, name="bench-opt-4x256", lm=LMSpec(source="random", config=LM))
    return build_pipeline(cfg, device=torch.device("cpu"), dtype=torch.float32)


def prompt_ids(pipe, n: int) -> list[int]:
    """n token ids (BOS included) of ordinary text."""
    text = "a photo of a small dog running on the grass next to a red ball in the park . "
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids * (n // 8 + 1)
    return ids[: n - 1]


def ours(pipe, ids: list[int], n_new: int) -> list[int]:
    s = GenerationSettings(max_new_tokens=n_new, mode="text", stop_at_eos=False, stop_strings=())
    return generate_batch(pipe, [[TokenIds(tuple(ids))]], s)[0].tokens


def hf(pipe, ids: list[int], n_new: int) -> list[int]:
    lm = pipe.model.lm
    x = torch.tensor([[pipe.tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        out = lm.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=True,
            pad_token_id=pipe.tokenizer.pad_token_id,
        )
    return out[0, x.shape[1] :].tolist()


def reference(pipe, ids: list[int], n_new: int) -> list[int]:
    """The published decoding: no cache, the LM over the whole sequence at every step."""
    m = pipe.model
    seq = [pipe.tokenizer.bos_token_id, *ids]
    out = []
    with torch.no_grad():
        embeds = m.embed_tokens(torch.tensor([seq]))
        for _ in range(n_new):
            logits = m.forward_lm(embeds, logits="last").logits[0, -1, : m.n_base]
            tok = int(logits.argmax())
            out.append(tok)
            embeds = torch.cat([embeds, m.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out


def section_decode(pipe, repeats: int) -> None:
    ids = prompt_ids(pipe, 64)
    a, b = ours(pipe, ids, NEW), hf(pipe, ids, NEW)
    assert a == b, "our greedy tokens differ from transformers generate"
    # Interleaved runs: both loops see the same load on a shared machine.
    fns = {"ours (KV cache)": ours, "transformers generate(use_cache=True)": hf}
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in fns for n in (1, NEW + 1)}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            for n in (1, NEW + 1):
                t = clock()
                fn(pipe, ids, n)
                if r:  # the first round is a warm-up
                    times[name, n].append(clock() - t)
    rows = [
        (name, (statistics.median(times[name, NEW + 1]) - statistics.median(times[name, 1])) / NEW * 1000)
        for name in fns
    ]
    print(f"\n## 1. decode ms/token, 64-token prompt, {NEW} new tokens (same tokens: {a == b})")
    print("| loop | ms/token |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    print(f"ratio ours / transformers: {rows[0][1] / rows[1][1]:.2f} (target <= 1.15)")


def section_reference(pipe, repeats: int) -> None:
    print(f"\n## 2. {NEW} new tokens, ours vs the reference loop (whole sequence every step)")
    print("| prompt tokens | ours (s) | reference (s) | speed-up |\n|---|---|---|---|")
    for n in (64, 256, 1024):
        ids = prompt_ids(pipe, n)
        assert ours(pipe, ids, 8) == reference(pipe, ids, 8)
        t_ours, t_ref = [], []
        ours(pipe, ids, NEW)  # warm-up
        for _ in range(repeats):  # interleaved, so that both loops see the same load
            for fn, acc in ((ours, t_ours), (reference, t_ref)):
                t = clock()
                fn(pipe, ids, NEW)
                acc.append(clock() - t)
        t_ours, t_ref = statistics.median(t_ours), statistics.median(t_ref)
        print(f"| {n} | {t_ours:.3f} | {t_ref:.3f} | {t_ref / t_ours:.1f}x |")


_chosen: list[float] = []  # clock() when each token was chosen


def _timed_sample(logits, **kw):
    """The engine's sampler, noting when each token is chosen: the first token may be invisible (a byte of a
    multi-byte character, a special token), so the first TextDelta is not the first token."""
    tokens = sample(logits, **kw)
    _chosen.append(clock())
    return tokens


generate_loop.sample = _timed_sample  # this script only: the decode loop calls the sampler by this name


def first_token_time(chat: Chat, message: list, settings: GenerationSettings) -> float:
    settings = dataclasses.replace(settings, temperature=0.0)
    _chosen.clear()
    t = clock()
    for _ in chat.send(message, settings):  # finish the turn so the history and cache hold it
        pass
    return _chosen[0] - t


def section_ttft(pipe, repeats: int) -> None:
    s = GenerationSettings(max_new_tokens=32, mode="text", stop_at_eos=False, stop_strings=())
    msgs = [[f"question number {i}: what is in the picture of the dog and the ball?"] for i in range(10)]
    t1, t10, cold = [], [], []
    for _ in range(repeats):
        chat = Chat(pipe)
        times = [first_token_time(chat, m, s) for m in msgs]
        t1.append(times[0])
        t10.append(times[9])
        # the same turn 10 with a cold cache: the whole history runs again
        fresh = Chat.from_dict(pipe, chat.to_dict())
        fresh.undo()
        cold.append(first_token_time(fresh, msgs[9], s))
    cached = len(chat._cache_keys)
    m1, m10, mc = statistics.median(t1), statistics.median(t10), statistics.median(cold)
    print(f"\n## 3. time to first token (chat, 32-token answers; turn 10 prompt = {cached - 31} positions)")
    print("| turn | ms |\n|---|---|")
    print(
        f"| 1 | {m1 * 1000:.1f} |\n| 10 (prefix cache reused) | {m10 * 1000:.1f} |\n"
        f"| 10, cold cache (history recomputed) | {mc * 1000:.1f} |"
    )
    print(f"ratio turn 10 / turn 1: {m10 / m1:.2f} (target <= 1.5)")


def section_unet() -> None:
    from fromage_gill.retrieve import ImageIndex, shipped_index_dir

    pipe = load_pipeline("tiny-gill", device="cpu", dtype="fp32")
    shipped = shipped_index_dir("tiny-gill")
    fingerprint = pipe.model.retrieval_fingerprint()
    if shipped is not None:
        pipe.index = ImageIndex.load(shipped, expected_fingerprint=fingerprint)
    else:
        from PIL import Image

        imgs = [Image.new("RGB", (32, 32), (40 * i, 80, 200 - 40 * i)) for i in range(4)]
        with torch.no_grad():
            emb = pipe.model.image_embedding(pipe.model.encode_images(pipe.model.vision.processor(imgs)))
        pipe.index = ImageIndex.from_embeddings(emb, [{"path": None, "url": None, "caption": None}] * 4, fingerprint)
    calls = {"unet": 0}
    unet = pipe.diffusion.unet
    orig = unet.forward

    def counting(*a, **k):
        calls["unet"] += 1
        return orig(*a, **k)

    unet.forward = counting
    print("\n## 4. UNet calls per turn (tiny-gill, one image per turn, 10 denoising steps)")
    print("| turn | image | UNet calls |\n|---|---|---|")
    for mode in ("retrieve", "generate", "auto"):
        calls["unet"] = 0
        s = GenerationSettings(
            max_new_tokens=4, mode=mode, image_logit_bias=float("inf"), max_images=1, num_inference_steps=10, seed=0
        )
        sources = [e.source for e in Chat(pipe).send(["show me a cat"], s) if isinstance(e, ImageResult)]
        print(f"| mode={mode} | {', '.join(sources) or 'none'} | {calls['unet']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    global clock
    clock = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = bench_pipeline()
    print(
        f"# bench_generate: OPT-style LM, 4 layers x 256 wide, vocab 512, random weights; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {'wall-clock' if args.wall else 'CPU'} time, "
        f"medians of {args.repeats} runs"
    )
    section_decode(pipe, args.repeats)
    section_reference(pipe, args.repeats)
    section_ttft(pipe, args.repeats)
    section_unet()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
