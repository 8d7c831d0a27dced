"""Replicas on Ray Serve (``fromage_gill.serve.ray_app``) on a local CPU cluster: two tiny-gill replicas behind one
OpenAI-compatible ingress. Requests spread over both; a replica killed under load is replaced by the controller
while the clients' retried requests all succeed. Ray starts and stops once, in the module's fixture."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from fromage_gill.serve.api import REPLICA_HEADER  # noqa: E402
from fromage_gill.serve.ray_app import APP_NAME, ReplicaSpec, ServeSpec, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BODY = {"model": "tiny-gill", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    # The workers must import this checkout's fromage_gill, offline, as the test process does
    env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    env.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    port = free_port()
    spec = ServeSpec(
        replica=ReplicaSpec(model="tiny-gill", pipeline_kwargs={"device": "cpu", "dtype": "fp32"}, fetch=None),
        replicas=2,
        num_cpus=1,
        health_check_period_s=1.0,
    )
    try:
        run(spec, host="127.0.0.1", port=port, blocking=False)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(url: str, deadline: float) -> httpx.Response:
    """One completion, retried on 503 / a dropped connection (what an OpenAI client does) until ``deadline``."""
    while True:
        try:
            r = httpx.post(f"{url}/chat/completions", json=BODY, timeout=60)
            if r.status_code not in (500, 502, 503, 504) or time.monotonic() > deadline:
                return r
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def replicas_seen(url: str, n: int, deadline: float) -> list[str]:
    out: list[str] = []

    def one() -> None:
        r = ask(url, deadline)
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        out.append(r.headers[REPLICA_HEADER])

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_requests_spread_over_both_replicas(cluster):
    models = httpx.get(f"{cluster}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny-gill"]
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen) < 2:  # concurrent requests go to the less busy replica; a few rounds see both
        assert time.monotonic() < deadline, f"only {seen} answered within 120 s"
        seen |= set(replicas_seen(cluster, 4, deadline))
    assert len(seen) == 2


def test_a_killed_replica_is_replaced_while_retried_requests_succeed(cluster):
    deadline = time.monotonic() + 240
    victim = replicas_seen(cluster, 1, deadline)[0]
    pid = int(victim.rsplit(":", 1)[1])
    assert pid not in (os.getpid(), os.getppid()), f"{victim} names this test's own process"
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(ask(cluster, deadline).status_code)

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)  # the replica's process dies mid-load
    seen: set[str] = set()
    while True:  # a new replica (a new id) answers beside the survivor
        assert time.monotonic() < deadline, f"no replacement for {victim} within 240 s (seen {seen})"
        seen |= set(replicas_seen(cluster, 4, deadline))
        if len(seen - {victim}) >= 2:
            break
    stop.set()
    for t in clients:
        t.join()
    assert victim not in seen or len(seen) >= 3
    assert results and all(code == 200 for code in results), results
    status = serve.status().applications[APP_NAME].deployments["ChatReplica"]
    assert status.replica_states.get("RUNNING") == 2
