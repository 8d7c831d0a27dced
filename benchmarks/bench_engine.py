"""The batching engine's aggregate throughput: N concurrent requests against one, in the same process and model.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py        # toy-gill, 1 vs 8 requests, 64 tokens each
    python benchmarks/bench_engine.py --model tiny-gill --clients 1 4 8 16 --tokens 32 --repeats 3

Each client sends its own question (text mode, greedy, no stop) and reads its events as they stream; the figure is
completion tokens of all clients / wall time from the first submit to the last TurnEnd, the client counts' runs
interleaved; the median and the best run of each are reported (on a shared CPU the best is the least disturbed).
Run it with ``OMP_NUM_THREADS=1``: a toy model's ops are too small to split, and on a busy CPU two threads per op
wait on each other (a solo turn measured 10x slower with 2). Then one conversation of
``--turns`` turns through ``EngineChat`` (the prefix cache serving its history): each turn's prefilled positions and
time to its first text. Then ``--follow-ups``: the client counts again, each client a conversation of 5 turns
through ``EngineChat`` (turns 2-5 join with their history cached), with the follow-ups' prompts prefilled inside
the batch's step (``mixed_prefill``, the default) and in a forward of their own (``mixed_prefill=0``), interleaved;
``--full-history`` keeps every exchange in the prompt (the toy presets keep the last one), so a follow-up's new
positions are its question and the answer's last token.
Prints one JSON line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "Show me a photo of a green triangle.",
    "What colour is the square?",
    "Describe the picture.",
    "Is there a circle in it?",
    "What is next to the red shape?",
    "Tell me about the blue star.",
    "How many shapes are there?",
    "Which shape is the largest?",
]


def run_clients(engine, pipeline, n: int, tokens: int) -> tuple[float, int]:
    """Wall seconds and completion tokens for ``n`` simultaneous requests."""
    from fromage_gill.generate import GenerationSettings, Turn
    from fromage_gill.generate.prompt import dialogue_pieces, encode_pieces, normalize_message

    s = GenerationSettings(max_new_tokens=tokens, mode="text", stop_at_eos=False, stop_strings=())
    prompts = []
    for i in range(n):
        turns = [Turn("user", normalize_message([f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"]))]
        pieces = dialogue_pieces(turns, pipeline.config.dialogue, pipeline.model.image_token_ids)
        prompts.append(encode_pieces(pipeline.tokenizer, pieces, pipeline.config.n_visual_tokens))
    engine.prefix_cache.clear()  # every request prefills its whole prompt, as a new conversation would
    counts = [0] * n
    start = threading.Barrier(n + 1)

    def client(i: int) -> None:
        start.wait()
        request = engine.submit(prompts[i], s)
        for _ in request:
            pass
        counts[i] = len(request.result.tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts)


def conversation(engine, turns: int, tokens: int) -> list[dict]:
    """One conversation of ``turns`` turns: per turn, prompt positions, positions prefilled, first-text seconds."""
    from fromage_gill.generate import GenerationSettings, TextDelta
    from fromage_gill.generate.engine_chat import EngineChat

    s = GenerationSettings(max_new_tokens=tokens, mode="text", stop_at_eos=False, stop_strings=())
    chat, out = EngineChat(engine), []
    engine.prefix_cache.clear()  # a new conversation: turn 1 prefills everything
    for t in range(turns):
        t0 = time.perf_counter()
        first = None
        for event in chat.send([f"{QUESTIONS[t % len(QUESTIONS)]} (turn {t + 1})"], s):
            if first is None and isinstance(event, TextDelta):
                first = time.perf_counter() - t0
        r = chat.last_result
        out.append({"turn": t + 1, "prompt": r.n_prompt, "prefilled": r.n_prefilled, "first_text_s": first})
    return out


def conversations(engine, n: int, turns: int = 5, *, full_history: bool = False) -> float:
    """Aggregate tokens/s of ``n`` simultaneous conversations of ``turns`` turns each (answers as the model ends
    them, greedy), through ``EngineChat``: from turn 2 on, each prompt's history is in the prefix cache."""
    import dataclasses

    from fromage_gill.generate import GenerationSettings
    from fromage_gill.generate.engine_chat import EngineChat

    config = engine.pipeline.config
    s = dataclasses.replace(GenerationSettings.for_model(config), mode="text", temperature=0.0)
    dialogue = dataclasses.replace(config.dialogue, max_exchanges=None) if full_history else None
    engine.prefix_cache.clear()
    counts = [0] * n
    start = threading.Barrier(n + 1)

    def client(k: int) -> None:
        chat = EngineChat(engine, dialogue=dialogue)
        start.wait()
        for t in range(turns):
            for _ in chat.send([QUESTIONS[(k + t) % len(QUESTIONS)]], s):
                pass
            counts[k] += len(chat.last_result.tokens)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def follow_ups(engine, clients: list[int], repeats: int, full_history: bool) -> None:
    """``conversations`` with mixed prefill on (the engine's default) and off, interleaved; medians and ratios."""
    default = engine.mixed_prefill
    rates: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeats):
        for mixed in (default, 0):
            engine.mixed_prefill = mixed
            for n in clients:
                rates.setdefault((mixed, n), []).append(conversations(engine, n, full_history=full_history))
    engine.mixed_prefill = default
    for (mixed, n), runs in sorted(rates.items()):
        line = {"follow_ups": True, "mixed_prefill": mixed, "clients": n}
        print(json.dumps({**line, "tokens_per_s_median": round(statistics.median(runs), 1)}))
    for mixed in (default, 0):
        base = statistics.median(rates[(mixed, clients[0])])
        for n in clients[1:]:
            r = statistics.median(rates[(mixed, n)])
            print(f"mixed_prefill={mixed}: {n} conversations {r:.1f} tokens/s = {r / base:.2f}x {clients[0]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-gill")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64, help="max_new_tokens of every request")
    ap.add_argument("--repeats", type=int, default=3, help="runs per client count; the median is reported")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--turns", type=int, default=20, help="turns of the conversation (0: skip it)")
    ap.add_argument("--follow-ups", action="store_true", help="5-turn conversations, mixed prefill on and off")
    ap.add_argument("--full-history", action="store_true", help="with --follow-ups: every exchange in the prompt")
    args = ap.parse_args(argv)

    import torch

    from fromage_gill import load_pipeline
    from fromage_gill.generate.engine import Engine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    pipeline = load_pipeline(args.model, device="cpu", dtype="fp32")
    rates: dict[int, float] = {}
    bests: dict[int, float] = {}
    with Engine(pipeline, max_batch=args.max_batch) as engine:
        run_clients(engine, pipeline, 2, 4)  # warm-up
        runs: dict[int, list[tuple[float, int]]] = {n: [] for n in args.clients}
        for _ in range(args.repeats):  # interleaved: a burst of load from elsewhere hits every client count alike
            for n in args.clients:
                runs[n].append(run_clients(engine, pipeline, n, args.tokens))
        for n in args.clients:
            rates[n] = statistics.median(tok / wall for wall, tok in runs[n])
            bests[n] = max(tok / wall for wall, tok in runs[n])
            walls = [round(w, 3) for w, _ in runs[n]]
            line = {"model": args.model, "clients": n, "tokens_per_s_median": round(rates[n], 1)}
            print(json.dumps({**line, "tokens_per_s_best": round(bests[n], 1), "wall_s": walls}))
        turns = conversation(engine, args.turns, 8) if args.turns else []
        if args.follow_ups:
            follow_ups(engine, args.clients, args.repeats, args.full_history)
    for t in turns:
        print(json.dumps(t))
    base = rates.get(1)
    if base:
        for n, r in rates.items():
            print(
                f"{n:>3} clients: {r:8.1f} tokens/s aggregate (median) = {r / base:.2f}x one client; "
                f"best runs {bests[n]:.1f} = {bests[n] / bests[1]:.2f}x"
            )
    if len(turns) > 1:
        a, b = turns[0], turns[-1]
        print(
            f"turn {b['turn']}: prompt {b['prompt']} positions, {b['prefilled']} prefilled, first text "
            f"{b['first_text_s'] * 1e3:.1f} ms; turn 1: {a['prefilled']} prefilled, {a['first_text_s'] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
