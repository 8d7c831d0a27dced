"""The app end to end through gradio_client (one Client = one browser session): first one session of 30 turns
alone (is turn 30 as quick as turn 1?), then eight simultaneous sessions of five turns each (checking that every
session sees only its own history); reports per-turn latency (median, p95).

    python benchmarks/bench_app_sessions.py                       # launches tiny-gill in-process on 127.0.0.1
    python benchmarks/bench_app_sessions.py --url http://HOST:7860/ --sessions 8 --turns 5   # a running app
    python benchmarks/bench_app_sessions.py --long-turns 0        # skip the long session

Latency is from submitting a message to the end of its streamed answer, so it includes waiting for the model
(one turn at a time by default: ``--concurrency 1``); "first update" is when the first piece of the answer
(or the "busy, N ahead of you" note) reached the client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "images" / "chelsea.jpg"


def launch(model: str, concurrency: int, max_queue: int) -> tuple[str, object]:
    sys.path.insert(0, str(ROOT))
    import app
    from fromage_gill import load_pipeline

    pipeline = load_pipeline(model, device="cpu", dtype="fp32")
    options = app.AppOptions(
        indexes=app.load_indexes(None, pipeline) or None, concurrency=concurrency, max_queue=max_queue
    )
    demo = app.build_demo(pipeline, options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/", demo


def session(
    url: str,
    k: int,
    turns: int,
    settings: dict,
    results: list,
    errors: list,
    start: threading.Barrier,
    photo_every: int = 0,
):
    """``turns`` turns of session ``k``: a photo with the first message (and every ``photo_every``-th)."""
    from gradio_client import Client, handle_file

    try:
        client = Client(url, verbose=False)
        start.wait()
        for t in range(turns):
            photo = t == 0 or (photo_every and t % photo_every == 0)
            message = {
                "text": f"session {k} turn {t}: what do you see?",
                "files": [handle_file(str(PHOTO))] if photo else [],
            }
            t0 = time.perf_counter()
            job = client.submit(message=message, api_name="/send", **settings)
            first = None
            while not job.done():
                if first is None and job.outputs():
                    first = time.perf_counter() - t0
                time.sleep(0.01)
            chat = job.result()[0]
            total = time.perf_counter() - t0
            results.append(
                {"session": k, "turn": t, "latency_s": total, "first_update_s": first or total, "messages": len(chat)}
            )
        h = client.predict(api_name="/history")
        users = [t["segments"][-1].get("text") for t in h["turns"] if t["role"] == "user"]
        expected = [f"session {k} turn {t}: what do you see?" for t in range(turns)]
        if users != expected:
            errors.append(f"session {k} sees {users}, expected only its own {expected}")
        if len(h["turns"]) != 2 * turns:
            errors.append(f"session {k} has {len(h['turns'])} turns, expected {2 * turns}")
    except Exception as e:  # a failed session is a finding of the benchmark, reported below
        errors.append(f"session {k}: {type(e).__name__}: {e}")


def long_session(url: str, turns: int, settings: dict, errors: list) -> list[dict]:
    """One session alone for ``turns`` turns: its per-turn results, in order."""
    results: list[dict] = []
    session(url, 0, turns, settings, results, errors, threading.Barrier(1), photo_every=5)
    return sorted(results, key=lambda r: r["turn"])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running app; default: launch --model in-process")
    p.add_argument("--model", default="tiny-gill")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=1, help="turns using the model at once (in-process app)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=4, help="diffusion steps of generated images")
    p.add_argument("--long-turns", type=int, default=30, help="turns of the long single session (0: skip it)")
    p.add_argument("--json", type=Path, help="also write the per-turn results here")
    args = p.parse_args(argv)

    demo = None
    url = args.url
    if url is None:
        url, demo = launch(args.model, args.concurrency, max_queue=max(16, args.sessions))
    settings = dict(max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps)
    long_errors: list[str] = []
    long = long_session(url, args.long_turns, settings, long_errors) if args.long_turns else []
    results: list[dict] = []
    errors: list[str] = []
    barrier = threading.Barrier(args.sessions)
    threads = [
        threading.Thread(target=session, args=(url, k, args.turns, settings, results, errors, barrier))
        for k in range(args.sessions)
    ]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if demo is not None:
        demo.close()

    if long:
        lat = [r["latency_s"] for r in long]
        n = len(lat)
        print(
            f"one session of {args.long_turns} turns on {args.model} (a photo every 5th message, "
            f"max_new_tokens {args.max_new_tokens}): completed {n}/{args.long_turns}"
        )
        if n >= 6:
            head, tail = statistics.median(lat[:3]), statistics.median(lat[-3:])
            print(
                f"| | turn 1 | turn {n} | turn {n} / turn 1 |\n|---|---|---|---|\n"
                f"| latency (s) | {lat[0]:.2f} | {lat[-1]:.2f} | {lat[-1] / lat[0]:.2f} |\n"
                f"| median of 3 (turns 1-3, {n - 2}-{n}) | {head:.2f} | {tail:.2f} | {tail / head:.2f} |"
            )
    errors = long_errors + errors

    lat = [r["latency_s"] for r in results]
    first = [r["first_update_s"] for r in results]
    print(
        f"{args.sessions} sessions x {args.turns} turns on {args.model} ({url}), model concurrency "
        f"{args.concurrency}, max_new_tokens {args.max_new_tokens}, {args.steps} diffusion steps"
    )
    print(
        f"completed turns: {len(results)}/{args.sessions * args.turns}; wall time {wall:.1f} s; "
        f"isolation: {'OK, each session saw only its own history' if not errors else 'FAILED'}"
    )
    if lat:
        print("| | median | p95 | max |\n|---|---|---|---|")
        print(f"| turn latency (s) | {statistics.median(lat):.2f} | {pct(lat, 0.95):.2f} | {max(lat):.2f} |")
        print(f"| first update (s) | {statistics.median(first):.2f} | {pct(first, 0.95):.2f} | {max(first):.2f} |")
    for e in errors:
        print("ERROR:", e)
    if args.json:
        args.json.write_text(
            json.dumps({"long_session": long, "results": results, "errors": errors, "wall_s": wall}, indent=1)
        )
    return 1 if errors or len(results) != args.sessions * args.turns else 0


if __name__ == "__main__":
    sys.exit(main())
