"""The OpenAI-compatible API under load, over HTTP with the ``openai`` client (``fromage-gill api``).

1. Sweep: 1, 4, 8, 16 concurrent clients x 5 turns each, every client its own stateless conversation (each turn
   sends the whole history, the answers as the client got them); aggregate completion tokens/s (all clients'
   completion tokens over the wall time of the sweep point), p50 / p95 turn latency (request to the stream's end),
   p50 / p95 first-token latency (request to the first content), the server's resident memory (RSS, sampled), and
   the CPU time per completion token of the server and of the benchmark's clients. Each point runs ``--repeats``
   times, the client counts interleaved (a burst of load from elsewhere hits them alike); each figure is the median
   of its runs (one run at 1 client lasts a tenth of a second: alone it swings 1.5x between runs).
2. Long conversation: one client, 20 turns, ``--repeats`` times; first-token latency at turn 20 against turn 1
   (medians over the runs), timed from the call and from the moment the request left the client (an httpx request
   hook): the ``openai`` client itself takes milliseconds more to build a request of 39 messages than of one, which
   the first figure counts and the server never sees.
3. Attachment abuse: 8 clients at once, each sending eight 8000 x 8000 PNGs in one message, while a well-behaved
   client sends text turns; the server's peak RSS above its level before, and the text turns' latency.

    python benchmarks/bench_serving.py                 # starts `fromage-gill api --model toy-gill` on 127.0.0.1
    python benchmarks/bench_serving.py --quick         # 1 and 4 clients x 2 turns, a 4-turn chat, small abuse
    python benchmarks/bench_serving.py --url http://HOST:8000/v1 --server-pid PID   # a running server

Settings: greedy, ``--max-tokens`` per answer, ``--mode`` (default auto: toy-gill shows retrieved pictures).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Show me a photo of a green triangle.",
    "What colour is the shape?",
    "Show me a red circle.",
    "What shape is this?",
    "Show me a blue square.",
]


class RSS:
    """Samples a process's resident memory every 50 ms in a thread; ``peak_mb(since)``; ``cpu_s()``: its CPU time."""

    def __init__(self, pid: int | None):
        import psutil

        self.proc = psutil.Process(pid) if pid else None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        if self.proc is not None:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except Exception:  # noqa: BLE001 -- the server went away: stop sampling
                return
            time.sleep(0.05)

    def cpu_s(self) -> float | None:
        if self.proc is None:
            return None
        t = self.proc.cpu_times()
        return t.user + t.system

    def now_mb(self) -> float | None:
        return round(self.proc.memory_info().rss / 2**20, 1) if self.proc else None

    def peak_mb(self, since: float) -> float | None:
        vals = [r for t, r in self.samples if t >= since]
        return round(max(vals) / 2**20, 1) if vals else None

    def stop(self) -> None:
        self._stop.set()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))], 3)


_sent = threading.local()  # when this thread's last request left the client (httpx's request hook)


def make_client(url: str, **kwargs):
    """An ``openai`` client whose httpx transport notes when each request is sent (``_sent.t``)."""
    import httpx
    import openai

    def note(request: httpx.Request) -> None:
        _sent.t = time.perf_counter()

    key = os.environ.get("FROMAGE_GILL_API_KEY", "none")
    http = httpx.Client(event_hooks={"request": [note]}, timeout=3600)
    return openai.OpenAI(base_url=url, api_key=key, timeout=3600, http_client=http, **kwargs)


def turn(client, model: str, messages: list[dict], settings: dict) -> dict:
    """One streamed turn: its latency, first-token latency (from the call, and from the request leaving the client),
    completion tokens and the answer's content."""
    t0 = time.perf_counter()
    first = after_send = None
    content = ""
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **settings
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
                after_send = time.perf_counter() - _sent.t
            content += chunk.choices[0].delta.content
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {
        "latency_s": total,
        "first_token_s": first if first is not None else total,
        "first_token_after_send_s": after_send if after_send is not None else total,
        "tokens": tokens,
        "content": content,
    }


def conversation(client, model: str, k: int, turns: int, settings: dict, out: list, errors: list, start) -> None:
    messages: list[dict] = []
    start.wait()
    try:
        for t in range(turns):
            messages.append({"role": "user", "content": f"{QUESTIONS[(k + t) % len(QUESTIONS)]}"})
            r = turn(client, model, messages, settings)
            messages.append({"role": "assistant", "content": r.pop("content")})
            out.append({"client": k, "turn": t + 1, **r})
    except Exception as e:  # noqa: BLE001 -- reported with the figures
        errors.append(f"client {k}: {type(e).__name__}: {e}")


def sweep_point(url: str, model: str, clients: int, turns: int, settings: dict, rss: RSS) -> dict:
    client = make_client(url)
    results: list[dict] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    threads = [
        threading.Thread(target=conversation, args=(client, model, k, turns, settings, results, errors, start))
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    mark = time.monotonic()
    server_cpu, own_cpu = rss.cpu_s(), sum(os.times()[:2])
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    own_cpu = sum(os.times()[:2]) - own_cpu
    server_cpu = rss.cpu_s() - server_cpu if server_cpu is not None else None
    lat = [r["latency_s"] for r in results]
    first = [r["first_token_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    per_token = lambda cpu: round(cpu / tokens * 1e3, 3) if tokens and cpu is not None else None  # noqa: E731
    return {
        "clients": clients,
        "turns": len(results),
        "errors": errors,
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": pct(lat, 0.5) if lat else None,
        "latency_p95_s": pct(lat, 0.95) if lat else None,
        "first_token_p50_s": pct(first, 0.5) if first else None,
        "first_token_p95_s": pct(first, 0.95) if first else None,
        "first_token_after_send_p50_s": pct([r["first_token_after_send_s"] for r in results], 0.5) if first else None,
        "rss_peak_mb": rss.peak_mb(mark),
        "server_cpu_ms_per_token": per_token(server_cpu),
        "client_cpu_ms_per_token": per_token(own_cpu),
    }


def median_point(runs: list[dict]) -> dict:
    """One sweep point from its repeated runs: each figure the median of the runs' (tokens/s of every run kept)."""
    import statistics

    out = {"clients": runs[0]["clients"], "runs": len(runs), "errors": [e for r in runs for e in r["errors"]]}
    for key, value in runs[0].items():
        if key not in out and isinstance(value, int | float):
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = round(statistics.median(values), 3) if values else None
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return out


def long_conversation(url: str, model: str, turns: int, settings: dict, repeats: int = 1) -> dict:
    """``repeats`` conversations of ``turns`` turns, one after another; per turn, the median first-token latency."""
    import statistics

    client = make_client(url)
    runs: list[list[dict]] = []
    errors: list[str] = []
    for _ in range(repeats):
        results: list[dict] = []
        conversation(client, model, len(runs), turns, settings, results, errors, threading.Barrier(1))
        runs.append(results)
    out: dict = {"turns": min(map(len, runs)), "runs": repeats, "errors": errors}
    for key, name in (("first_token_s", "from_call"), ("first_token_after_send_s", "after_send")):
        firsts = [statistics.median(r[t][key] for r in runs) for t in range(out["turns"])]
        out[name] = {
            "first_token_s": [round(f, 4) for f in firsts],
            "turn1_s": round(firsts[0], 4) if firsts else None,
            "last_s": round(firsts[-1], 4) if firsts else None,
            "ratio": round(firsts[-1] / firsts[0], 2) if firsts else None,
        }
    return out


def big_png(side: int) -> bytes:
    """A ``side`` x ``side`` PNG that compresses well (a few hundred KB for 8000 x 8000), as an abuser would send."""
    from PIL import Image

    img = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def abuse(url: str, model: str, clients: int, images: int, side: int, rss: RSS, settings: dict) -> dict:
    import openai

    client = make_client(url, max_retries=0)
    data = "data:image/png;base64," + base64.b64encode(big_png(side)).decode()
    content = [{"type": "text", "text": "What is in these pictures?"}] + [
        {"type": "image_url", "image_url": {"url": data}} for _ in range(images)
    ]
    before = rss.now_mb()
    mark = time.monotonic()
    statuses: list[str] = []

    def send() -> None:
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **settings)
            statuses.append("200")
        except openai.APIStatusError as e:
            statuses.append(str(e.status_code))
        except Exception as e:  # noqa: BLE001
            statuses.append(type(e).__name__)

    threads = [threading.Thread(target=send) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    text_turns = []
    while any(t.is_alive() for t in threads):  # a well-behaved client's text turns meanwhile
        r = turn(client, model, [{"role": "user", "content": QUESTIONS[1]}], settings)
        text_turns.append(round(r["latency_s"], 3))
    for t in threads:
        t.join()
    return {
        "clients": clients,
        "images_each": images,
        "side": side,
        "png_bytes": len(base64.b64decode(data.split(",", 1)[1])),
        "statuses": sorted(statuses),
        "wall_s": round(time.perf_counter() - t0, 2),
        "rss_before_mb": before,
        "rss_peak_mb": rss.peak_mb(mark),
        "rss_added_mb": round(rss.peak_mb(mark) - before, 1) if before and rss.peak_mb(mark) else None,
        "text_turns": len(text_turns),
        "text_turn_p50_s": pct(text_turns, 0.5) if text_turns else None,
        "text_turn_p95_s": pct(text_turns, 0.95) if text_turns else None,
        "text_turn_max_s": max(text_turns, default=None),
    }


def start_server(model: str, concurrency: int, extra: list[str]) -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fromage_gill.cli", "api", "--model", model, "--port", str(port)]
    cmd += ["--device", "cpu", "--concurrency", str(concurrency), "--max-queue", "64", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def run_all(url: str, model: str, args, rss: RSS) -> dict:
    settings = {"max_tokens": args.max_tokens, "temperature": 0, "extra_body": {"mode": args.mode}}
    out: dict = {"model": model, "url": url, "settings": {"max_tokens": args.max_tokens, "mode": args.mode}}
    out["rss_idle_mb"] = rss.now_mb()
    turn(make_client(url), model, [{"role": "user", "content": "hi"}], settings)
    runs: dict[int, list[dict]] = {n: [] for n in args.clients}
    for _ in range(args.repeats):  # interleaved: a burst of load from elsewhere hits every client count alike
        for n in args.clients:
            runs[n].append(sweep_point(url, model, n, args.turns, settings, rss))
    out["sweep"] = [median_point(runs[n]) for n in args.clients]
    for point in out["sweep"]:
        print(json.dumps(point), flush=True)
    base = out["sweep"][0]
    for p in out["sweep"]:
        p["tokens_per_s_vs_1"] = round(p["tokens_per_s"] / base["tokens_per_s"], 2) if base["tokens_per_s"] else None
        p["p95_vs_1_p50"] = round(p["latency_p95_s"] / base["latency_p50_s"], 2) if base["latency_p50_s"] else None
    if args.long_turns:
        out["long"] = long_conversation(url, model, args.long_turns, settings, args.repeats)
        print(json.dumps(out["long"]), flush=True)
    if args.abuse_clients:
        text = {"max_tokens": args.max_tokens, "temperature": 0, "extra_body": {"mode": "text"}}
        out["abuse"] = abuse(url, model, args.abuse_clients, args.abuse_images, args.abuse_side, rss, text)
        print(json.dumps(out["abuse"]), flush=True)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-gill")
    ap.add_argument("--url", help="a running server's /v1 address (default: start one)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, for its RSS")
    ap.add_argument("--concurrency", type=int, default=1, help="the started server's --concurrency")
    ap.add_argument("--server-arg", action="append", default=[], help="another flag for the started server")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each sweep point (and of the long chat): medians")
    ap.add_argument("--long-turns", type=int, default=20, help="0: skip the long conversation")
    ap.add_argument("--abuse-clients", type=int, default=8, help="0: skip the attachment abuse")
    ap.add_argument("--abuse-images", type=int, default=8)
    ap.add_argument("--abuse-side", type=int, default=8000)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--mode", default="auto", choices=["auto", "retrieve", "generate", "text"])
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients x 2 turns, 4-turn chat, 2 x 2 images")
    ap.add_argument("--json", type=Path)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.quick:
        args.clients, args.turns, args.long_turns, args.repeats = [1, 4], 2, 4, 1
        args.abuse_clients, args.abuse_images, args.abuse_side = 2, 2, 2000
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        url, proc = start_server(args.model, args.concurrency, args.server_arg)
        pid = proc.pid
    rss = RSS(pid)
    try:
        out = run_all(url, args.model, args, rss)
    finally:
        rss.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
