"""``fromage-gill api`` as a user runs it: the whole command in a subprocess, reached with the ``openai`` client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from fromage_gill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_api_refuses_a_bad_autoscale_with_the_flag_named(capsys):
    pytest.importorskip("ray")
    assert main(["api", "--model", "tiny-gill", "--ray", "--autoscale", "four"]) == 2
    assert "--autoscale 'four': expected MIN:MAX replicas" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch", "0", "--max-batch must be >= 1, got 0"),
        ("--kv-cache-gb", "-1", "--kv-cache-gb must be >= 0 (0: no prefix cache), got -1.0"),
        ("--image-budget-gb", "0", "--image-budget-gb must be > 0, got 0.0"),
        ("--image-workers", "0", "--image-workers must be >= 1, got 0"),
    ],
)
def test_api_refuses_a_bad_engine_flag_before_loading_the_model(capsys, flag, value, message):
    assert main(["api", "--model", "tiny-gill", flag, value]) == 2
    assert message in capsys.readouterr().err


@contextlib.contextmanager
def api_server(*flags: str) -> Iterator[str]:
    """``fromage-gill api --model tiny-gill`` with ``flags`` in a subprocess, once it answers; its /v1 address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fromage_gill.cli", "api", "--model", "tiny-gill", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--port", str(port), *flags], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "fromage-gill api exited"
            assert time.monotonic() < deadline, "fromage-gill api did not answer within 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_the_api_command_serves_the_openai_client_and_wants_its_key():
    with api_server("--api-key", "k3y") as url:
        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-gill"]
        r = client.chat.completions.create(
            model="tiny-gill", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()


@pytest.mark.slow
def test_the_api_command_batches_concurrent_requests_by_default():
    """Without flags the server is the batching engine: four concurrent answers share decode steps (the engine's
    counters on /health), and each is the answer it gets alone."""
    with api_server("--max-batch", "4") as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)

        def ask(q: str) -> tuple[str, int]:
            r = client.chat.completions.create(
                model="tiny-gill", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
            )
            return r.choices[0].message.content, r.usage.completion_tokens

        questions = ["hi", "a cat", "what is this?", "show me a dog"]
        alone = [ask(q) for q in questions]
        before = httpx.get(f"{url}/health").json()["engine"]
        assert before["largest_batch"] == 1  # one at a time so far
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, questions))
        after = httpx.get(f"{url}/health").json()["engine"]
        assert together == alone  # greedy: batch mates change nothing
        tokens = sum(n for _, n in together)
        assert tokens > 4 and after["tokens"] - before["tokens"] == tokens
        assert after["largest_batch"] >= 2
        assert after["steps"] - before["steps"] < tokens  # some steps decoded several answers at once
