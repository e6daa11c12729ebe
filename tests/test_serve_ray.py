"""`sdonnx serve --ray`: the same app on a local Ray cluster (loopback) with 2 replicas, each its own model."""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
import signal
import time

import pytest

pytest.importorskip("fastapi")
ray_serve = pytest.importorskip("ray.serve")
import httpx  # noqa: E402

from test_serve import free_port, wait_until  # noqa: E402

pytestmark = pytest.mark.slow  # Ray's start takes ~15 s and two replicas load a model each


@pytest.fixture(scope="module")
def url():
    import ray

    from sdonnx.serve import ray as sdonnx_ray

    port = free_port()
    sdonnx_ray.start("127.0.0.1", port, sdonnx_ray.application(replicas=2, max_queue=32))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def txt2img(url: str, seed: int, steps: int = 2, size: int = 64) -> tuple[int, dict | str]:
    """(status, served_by) of one request; an error status with its body; -1 when no answer came at all."""
    try:
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "ray", "steps": steps, "width": size,
                                                        "height": size, "seed": seed}, timeout=180)
    except httpx.HTTPError as err:
        return -1, repr(err)
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, json.loads(r.json()["info"])["served_by"]


def test_forty_concurrent_requests_spread_over_both_replicas(url):
    with futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda k: txt2img(url, k), range(40)))
    assert [status for status, _ in results] == [200] * 40, [r for r in results if r[0] != 200]
    replicas = {served["replica"] for _, served in results}
    pids = {served["pid"] for _, served in results}
    assert len(replicas) == 2 and len(pids) == 2 and os.getpid() not in pids


def test_a_killed_replica_loses_no_request_silently(url):
    victim = txt2img(url, 0)[1]["pid"]
    with futures.ThreadPoolExecutor(20) as pool:
        pending = [pool.submit(txt2img, url, k, 30, 128) for k in range(20)]
        time.sleep(3)  # both replicas busy with a queue each
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in pending]
    statuses = [status for status, _ in results]
    # every request is answered: done by a replica, or an error status from Ray's proxy; no timeout, no hang
    assert all(s == 200 or 500 <= s < 600 for s in statuses), results
    assert any(s == 200 for s in statuses)
    print(f"after the kill: {statuses.count(200)} answered 200, {len(statuses) - statuses.count(200)} errors "
          f"({sorted(set(statuses))})")
    # the controller replaces the replica: two live replicas serve again, the killed process not among them
    seen: set = set()

    def two_again() -> bool:
        status, served = txt2img(url, len(seen))
        if status == 200:
            seen.add(served["pid"])
        return len(seen - {victim}) == 2

    wait_until(two_again, timeout=120)
    assert victim not in seen
