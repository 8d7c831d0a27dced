"""ms/token of MAGIC decoding (k=45) against (a) greedy decoding of the same LM and (b) a straightforward
implementation of the same rule that runs the LM over the full sequence for every candidate (no KV cache).

Shapes are those of the published setup: a GPT-2 small LM (12 layers, 768 wide, like cambridgeltl/magic_mscoco) and
a CLIP ViT-B/32 (openai/clip-vit-base-patch32), with random weights since this machine has no model hub; speed
does not depend on the weight values. Both tokenizers are CLIP's real BPE (49,408 tokens, shipped with open_clip),
so the LM head has GPT-2's size and CLIP reads texts of realistic length. Generation never stops early (no stop
token): every run produces exactly --new-tokens tokens, and the straightforward implementation is checked to choose
the very same tokens as ours.

    python benchmarks/bench_magic.py                       # the README figures
    python benchmarks/bench_magic.py --size tiny --repeats 1   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fromage_gill.config import MagicDecoding
from fromage_gill.images import ImageProcessor
from fromage_gill.magic import ClipGuide, LMStep, hf_step, magic_search

SIZES = {
    "small": {
        "lm": {"n_embd": 768, "n_layer": 12, "n_head": 12},
        "clip_text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "clip_vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        "projection_dim": 512,
    },
    "tiny": {
        "lm": {"n_embd": 64, "n_layer": 2, "n_head": 4},
        "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "clip_vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        "projection_dim": 16,
    },
}


def clip_bpe_tokenizer():
    """CLIP's tokenizer built offline from the BPE merges open_clip ships (the Hub's openai/clip-* use the same)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build(size: str, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel

    s = SIZES[size]
    tok = clip_bpe_tokenizer()
    torch.manual_seed(seed)
    lm = (
        GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tok),
                n_positions=1024,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                **s["lm"],
            )
        )
        .eval()
        .requires_grad_(False)
    )
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(tok),
                "max_position_embeddings": 77,
                "eos_token_id": tok.eos_token_id,
                "bos_token_id": tok.bos_token_id,
                "pad_token_id": tok.pad_token_id,
                **s["clip_text"],
            },
            vision_config=s["clip_vision"],
            projection_dim=s["projection_dim"],
        )
    )
    guide = ClipGuide(clip, tok, ImageProcessor(size=s["clip_vision"]["image_size"]))
    return lm, tok, guide


@torch.no_grad()
def greedy(lm, prompt: torch.Tensor, n: int) -> list[int]:
    """Plain KV-cached greedy decoding: one LM forward of one token per step."""
    out = lm(input_ids=prompt, use_cache=True)
    ids = []
    for _ in range(n):
        token = out.logits[0, -1].argmax()
        ids.append(int(token))
        out = lm(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return ids


def magic(lm, tok, clip_logits, prompt: torch.Tensor, s: MagicDecoding) -> list[int]:
    step = hf_step(lm)
    with torch.no_grad():
        start: LMStep = step(prompt, None)
    return list(magic_search(step, start, s, decode=tok.decode, clip_logits=clip_logits))


@torch.no_grad()
def straightforward(lm, tok, clip_logits, prompt: torch.Tensor, s: MagicDecoding) -> list[int]:
    """The same rule with no cache: per step, the LM over the whole sequence, then once more per candidate."""
    ids, generated = prompt[0].tolist(), []
    for _ in range(s.max_new_tokens):
        logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].float()
        probs = logits.softmax(-1)
        top_p, top = probs.topk(s.k)
        hidden = []
        for v in top.tolist():
            h = lm(input_ids=torch.tensor([ids + [v]]), output_hidden_states=True).hidden_states[-1][0]
            hidden.append(F.cosine_similarity(h[-1:], h[:-1], dim=-1).max())
        penalty = torch.stack(hidden)
        texts = [tok.decode((generated + [v])[-s.clip_text_max_tokens :]) for v in top.tolist()]
        f = clip_logits(texts).softmax(-1) if s.beta > 0 else torch.zeros_like(top_p)
        best = int(((1 - s.alpha) * top_p - s.alpha * penalty + s.beta * f).argmax())
        ids.append(int(top[best]))
        generated.append(int(top[best]))
    return generated


def timed(fn, repeats: int) -> tuple[float, list[int]]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--k", type=int, default=45)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-straightforward", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm, tok, guide = build(args.size)
    from PIL import Image

    image = Image.new("RGB", (320, 240), (120, 160, 40))
    clip_logits = guide.logits_fn([image])  # once per image, outside the timed loops as in real use
    prompt = torch.randint(0, len(tok) - 2, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    s = MagicDecoding(k=args.k, alpha=args.alpha, beta=args.beta, max_new_tokens=args.new_tokens)
    n = args.new_tokens

    rows = []
    t_greedy, _ = timed(lambda: greedy(lm, prompt, n), args.repeats)
    rows.append(("greedy (KV cache)", t_greedy))
    t_cs, _ = timed(
        lambda: magic(lm, tok, None, prompt, MagicDecoding(k=args.k, alpha=args.alpha, beta=0.0, max_new_tokens=n)),
        args.repeats,
    )
    rows.append((f"contrastive search, ours (k={args.k})", t_cs))
    t_magic, ours = timed(lambda: magic(lm, tok, clip_logits, prompt, s), args.repeats)
    rows.append((f"MAGIC, ours (k={args.k}, one batched LM forward + one CLIP batch per step)", t_magic))
    if not args.skip_straightforward:
        t_naive, naive = timed(lambda: straightforward(lm, tok, clip_logits, prompt, s), max(1, min(args.repeats, 2)))
        rows.append((f"MAGIC, straightforward (k={args.k}, LM over the full sequence per candidate)", t_naive))
        if naive != ours:
            raise SystemExit(f"the straightforward implementation chose other tokens: {naive} vs {ours}")

    print(
        f"\nsize={args.size} k={args.k} alpha={args.alpha} beta={args.beta} prompt={args.prompt_tokens} token(s) "
        f"new={n} tokens threads={args.threads} (median of {args.repeats})\n"
    )
    print("| decoding | ms/token |")
    print("|---|---:|")
    for name, t in rows:
        print(f"| {name} | {1000 * t / n:.1f} |")
    print(f"\nMAGIC / greedy: {t_magic / t_greedy:.1f}x slower")
    if not args.skip_straightforward:
        print(f"straightforward / MAGIC: {t_naive / t_magic:.1f}x slower (same tokens chosen)")


if __name__ == "__main__":
    main()
